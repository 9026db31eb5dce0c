-- lua/nemo/ops/linalg.lua: matrix products and attention, as in torch / torch.nn.functional:
--   F.matmul(a, b)   torch.matmul: 1-D operands get a dim prepended (left) / appended (right)
--                    and dropped from the result, batch dims broadcast; also a:matmul(b)
--   F.mm(a, b) (2-D), F.bmm(a, b) (3-D, equal batch), F.mv(a, v), F.dot(u, v); methods too
--   F.linear(x, weight, bias)   y = x weight^T + bias over the last dim of x
--   F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale), or with
--     the keywords in a final table: F.scaled_dot_product_attention(q, k, v, {is_causal = true})
--
-- Float dtypes only, all operands of one dtype (PyTorch's rule); bf16/f16 multiply in float32.
-- Transposed and permuted views go to BLAS as they are (no copy). A node keeps only what its
-- backward reads: an operand whose partner needs no gradient is kept as a shape (a 1-element
-- tensor expanded to its shape), so frozen weights do not pin activations. Attention keeps
-- q, k, v, its output and one logsumexp per query row, and on the CPU the (Sq, Sk) probabilities
-- while they fit a budget (F.set_attention_probs_budget, below).
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"
local F = require "nemo.functional"

local C = nffi.C
local check = nffi.check
local wrap, is_tensor = Tensor.wrap, Tensor.is_tensor
local methods = Tensor.methods
local node_of, save = autograd.node, autograd.save
local NAN = 0 / 0

-- out-parameters, reused by every call (each result is wrapped before the next call)
local out_t = ffi.typeof("nemo_tensor*[1]")
local o1, o2, o3 = out_t(), out_t(), out_t()
local zero_strides = ffi.new("int64_t[8]")

local function want_tensor(op, what, v, optional)
    if v == nil and optional then return nil end
    if not is_tensor(v) then
        error(string.format("%s: expected a tensor for %s, got %s", op, what, type(v)), 3)
    end
    return v
end

-- A tensor with t's shape, dtype and device over one element (stride 0 everywhere): what a
-- backward needs of an operand whose values it never reads.
local function shape_only(t)
    local c = t._c
    local one = Tensor.empty({1}, {dtype = t.dtype, device = t.device})
    local v = wrap(C.nemo_tensor_view(one._c, c.ndim, c.shape, zero_strides, one._c.offset))
    one:free()
    return v
end

-- ==== matmul, mm, bmm, mv, dot ====

local function matmul_bw(node, g)
    local need = node.need
    check(C.nemo_matmul_backward(g._c, node.a._c, node.b._c, need[1] and o1 or nil, need[2] and o2 or nil))
    local ga = need[1] and wrap(o1[0]) or nil
    local gb = need[2] and wrap(o2[0]) or nil
    return ga, gb
end

local function product(name, kind)
    return function(a, b)
        want_tensor(name, "the first operand", a)
        want_tensor(name, "the second operand", b)
        local y = wrap(C.nemo_matmul(a._c, b._c, kind))
        local node = node_of(name, matmul_bw, y, a, b)
        if node then
            -- da = g b^T reads b; db = a^T g reads a
            node.a = save(node, node.need[2] and a or shape_only(a))
            node.b = save(node, node.need[1] and b or shape_only(b))
        end
        return y
    end
end

F.matmul = product("matmul", C.NEMO_MM_MATMUL)
F.mm = product("mm", C.NEMO_MM_MM)
F.bmm = product("bmm", C.NEMO_MM_BMM)
F.mv = product("mv", C.NEMO_MM_MV)
F.dot = product("dot", C.NEMO_MM_DOT)
for _, name in ipairs { "matmul", "mm", "bmm", "mv", "dot" } do methods[name] = F[name] end

-- ==== linear ====

local function linear_bw(node, g)
    local need = node.need
    check(C.nemo_linear_backward(g._c, node.x._c, node.w._c, need[1] and o1 or nil, need[2] and o2 or nil,
        need[3] and o3 or nil))
    local dx = need[1] and wrap(o1[0]) or nil
    local dw = need[2] and wrap(o2[0]) or nil
    local db = need[3] and wrap(o3[0]) or nil
    return dx, dw, db
end

function F.linear(x, weight, bias)
    want_tensor("linear", "input", x)
    want_tensor("linear", "weight", weight)
    want_tensor("linear", "bias", bias, true)
    local y = wrap(C.nemo_linear(x._c, weight._c, bias and bias._c or nil))
    local node = node_of("linear", linear_bw, y, x, weight, bias)
    if node then
        -- dx = g W reads W; dW = g^T x reads x; db reads g only
        node.x = save(node, node.need[2] and x or shape_only(x))
        node.w = save(node, node.need[1] and weight or shape_only(weight))
    end
    return y
end

-- ==== scaled_dot_product_attention ====

local SDPA = "scaled_dot_product_attention"
local sdpa_names = {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}

-- Positional arguments after q, k, v, where the first plain (non-tensor) table is an options
-- table holding the remaining names.
local function sdpa_args(...)
    local res = {}
    for i = 1, #sdpa_names do
        local v = select(i, ...)
        if type(v) == "table" and not is_tensor(v) then
            for j = i, #sdpa_names do res[sdpa_names[j]] = v[sdpa_names[j]] end
            for k in pairs(v) do
                local known = false
                for _, n in ipairs(sdpa_names) do if n == k then known = true end end
                if not known then error(SDPA .. ": unknown option '" .. tostring(k) .. "'", 3) end
            end
            break
        end
        res[sdpa_names[i]] = v
    end
    return res
end

-- Kept probabilities. Where the device has the kernels (the CPU), a forward that records a
-- graph may keep P (Sq x Sk values per batch and head) for the backward, which then skips the
-- q k^T product and its exponentials (about 8% of the backward of the medium FLUX bench). The
-- kept matrices of all live graphs share a budget (F.set_attention_probs_budget); a call that
-- does not fit recomputes P in the backward as before. A graph's P is counted until its node's
-- backward ran or the node was collected.
local probs_budget = 512 * 2 ^ 20
local probs_live = 0

-- F.set_attention_probs_budget(bytes): the most bytes of kept attention probabilities (0: never
-- keep them, the memory-lean FlashAttention-style backward). Returns the previous budget.
function F.set_attention_probs_budget(bytes)
    if type(bytes) ~= "number" or bytes < 0 or bytes ~= bytes then
        error("set_attention_probs_budget: expected a number of bytes >= 0, got " .. tostring(bytes), 2)
    end
    local prev = probs_budget
    probs_budget = bytes
    return prev
end
-- F.attention_probs_kept(): bytes of attention probabilities held for backward passes now.
function F.attention_probs_kept() return probs_live end

-- F.sdpa_uses_flash(q, k, v[, {attn_mask=}]): true when scaled_dot_product_attention on these
-- tensors runs the fused low-precision kernels (bf16 / f16, no mask, head dim 64 or 128) unless
-- it keeps its probabilities (CPU, within the budget above). On CUDA: flash attention on tensor
-- cores; on the CPU the same numbers as the float32 path.
function F.sdpa_uses_flash(q, k, v, opts)
    local mask = opts and opts.attn_mask
    return C.nemo_sdpa_uses_flash(q._c, k._c, v._c, mask and mask._c or nil) ~= 0
end
-- F.enable_flash_sdp(bool) allows or forbids the fused kernels (as torch.backends.cuda's); returns
-- the previous setting. F.flash_sdp_enabled(). Environment: NEMO_FLASH=0 starts with them off.
function F.enable_flash_sdp(on)
    if type(on) ~= "boolean" then error("enable_flash_sdp: expected a boolean, got " .. type(on), 2) end
    return C.nemo_sdpa_enable_flash(on and 1 or 0) ~= 0
end
function F.flash_sdp_enabled() return C.nemo_sdpa_enable_flash(-1) ~= 0 end

-- bytes P would take, when it fits the budget
local function keep_probs(q, k)
    if probs_budget <= 0 then return nil end
    local n = 1
    for i = 1, q:dim() - 1 do n = n * q.shape[i] end
    local bytes = n * k.shape[k:dim() - 1] * (q.dtype == "float64" and 8 or 4)
    if probs_live + bytes > probs_budget then return nil end
    return bytes
end
local function hold_probs(node, bytes)
    probs_live = probs_live + bytes
    node.probs_token = ffi.gc(ffi.new("char[1]"), function() probs_live = probs_live - bytes end)
    node.probs_bytes = bytes
end
local function drop_probs(node)
    local t = node.probs_token
    if t then
        ffi.gc(t, nil)
        probs_live = probs_live - node.probs_bytes
        node.probs_token = nil
    end
end

local function sdpa_bw(node, g)
    local need = node.need
    local m = node.mask
    check(C.nemo_sdpa_backward(g._c, node.q._c, node.k._c, node.v._c, m and m._c or nil, node.out._c, node.lse._c,
        node.probs and node.probs._c or nil, node.causal, node.scale, need[1] and o1 or nil, need[2] and o2 or nil, need[3] and o3 or nil))
    local dq = need[1] and wrap(o1[0]) or nil
    local dk = need[2] and wrap(o2[0]) or nil
    local dv = need[3] and wrap(o3[0]) or nil
    drop_probs(node)
    return dq, dk, dv
end

function F.scaled_dot_product_attention(q, k, v, ...)
    local a = sdpa_args(...)
    want_tensor(SDPA, "query", q)
    want_tensor(SDPA, "key", k)
    want_tensor(SDPA, "value", v)
    local mask = want_tensor(SDPA, "attn_mask", a.attn_mask, true)
    local p = a.dropout_p or 0
    if type(p) ~= "number" then error(SDPA .. ": dropout_p must be a number, got " .. type(p), 2) end
    if p ~= 0 then error(string.format("%s: dropout_p > 0 is not supported yet (got %g)", SDPA, p), 2) end
    if a.enable_gqa then error(SDPA .. ": enable_gqa is not supported yet", 2) end
    local scale = a.scale
    if scale ~= nil and type(scale) ~= "number" then error(SDPA .. ": scale must be a number, got " .. type(scale), 2) end
    local causal = a.is_causal and 1 or 0
    local grad = autograd.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad) or false
    if grad and mask and mask.requires_grad then
        error(SDPA .. ": the gradient with respect to a float attn_mask is not supported yet (detach it)", 2)
    end
    scale = scale or NAN
    local keep = grad and keep_probs(q, k)
    check(C.nemo_sdpa(q._c, k._c, v._c, mask and mask._c or nil, causal, scale, o1, grad and o2 or nil,
        keep and o3 or nil))
    local y = wrap(o1[0])
    if not grad then return y end
    local lse = wrap(o2[0])
    local probs = keep and o3[0] ~= nil and wrap(o3[0]) or nil
    local node = node_of(SDPA, sdpa_bw, y, q, k, v)
    node.q, node.k, node.v = save(node, q), save(node, k), save(node, v)
    node.out = save(node, y)
    node.lse = save(node, lse)
    lse:free()
    if probs then
        node.probs = save(node, probs)
        probs:free()
        hold_probs(node, keep)
    end
    node.mask = save(node, mask)
    node.causal, node.scale = causal, scale
    return y
end

return F
