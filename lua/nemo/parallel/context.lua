-- lua/nemo/parallel/context.lua: context parallelism (Ulysses sequence parallelism, what
-- diffusers' ContextParallelConfig(ulysses_degree = cp) does and Automodel's fsdp.cp_size turns on).
-- The cp ranks of a group each hold a contiguous 1/P slice of the token sequence; everything but
-- attention is token-wise, so each rank computes only its own tokens. Attention exchanges heads
-- for tokens with one all-to-all of q, k and v together (each rank then sees every token for H/P
-- of the heads), attends, and exchanges the output back with a second one. The model's output is gathered along the sequence, so
-- a context-parallel model returns what the model on one process returns.
--
--   local cp = require "nemo.parallel.context"
--   local x_local = cp.split(x, 1, group)            -- this rank's slice of dim 1 (contiguous)
--   local o = cp.attention(q, k, v, group)           -- (B, H, S/P, Dh) in and out, SDPA over all S
--   local y = cp.gather(y_local, 1, group)           -- every rank's slice, in rank order
--
-- Gradients: cp.split's backward puts the slice's gradient at its place (zeros elsewhere),
-- cp.gather's backward keeps this rank's slice of the gradient, and the all-to-alls' backward is
-- the same all-to-all. So each rank's parameter gradients are what its own tokens contribute, and
-- their sum over the cp group is the gradient of the whole sequence: the FSDP2 manager's
-- reduce-scatter over dp_shard_cp sums over cp (and averages over dp) for that reason.
--
-- Non-obvious rules:
-- - q, k and v of one shape travel in one all-to-all (self-attention, FLUX's joint attention).
-- - The collectives run in the order the graph runs, which is the same on every rank of the
--   group (the same model, the same shapes); a rank that skips an attention hangs the others
--   until the process group's timeout.
-- - Sequence lengths must be multiples of P, and the head count too (each rank attends with
--   H/P heads); the errors say which.
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"
local F = require "nemo.functional"
local dist = require "nemo.dist"

local M = {}

local free = Tensor.free_all

-- The {group, size, rank} of a cp group (a nemo.dist group, or nil for the world).
local function info(group)
    group = group or dist.group_world()
    return group, group:size(), group:rank()
end
M.info = info

-- ==== the two differentiable collectives ====

-- all_to_all over dim 0 (size P): chunk j goes to rank j, chunk i of the result came from rank i.
-- Its own adjoint: the backward is the same exchange of the gradient.
local a2a_bw
local function all_to_all(x, group)
    local xc = x:contiguous()
    local out = Tensor.empty(xc.shape, {dtype = xc.dtype, device = xc.device})
    autograd.no_grad(dist.all_to_all_single, out, xc, {group = group})
    if not rawequal(xc, x) then free(xc) end
    local node = autograd.node("cp_all_to_all", a2a_bw, out, x)
    if node then node.group = group end
    return out
end
a2a_bw = function(node, g)
    return all_to_all(g, node.group)
end
M.all_to_all = all_to_all

-- all-gather into a new leading dim (P, ...): rank i's x at index i. Backward: this rank's slice.
local function gather_bw(node, g)
    local s = g:select(0, node.rank)
    local c = s:contiguous()
    if not rawequal(c, s) then free(s) end
    return c
end
local function all_gather_stack(x, group)
    local g, P, r = info(group)
    local xc = x:contiguous()
    local shape = {P}
    for i, n in ipairs(xc.shape) do shape[i + 1] = n end
    local out = Tensor.empty(shape, {dtype = xc.dtype, device = xc.device})
    autograd.no_grad(dist.all_gather_into_tensor, out, xc, {group = g})
    if not rawequal(xc, x) then free(xc) end
    local node = autograd.node("cp_all_gather", gather_bw, out, x)
    if node then node.rank = r end
    return out
end

-- ==== sequence split and gather ====

local function check_len(n, P, what)
    if n % P ~= 0 then
        error(string.format("context parallelism: %s has %d tokens, which the cp group of %d ranks cannot split " ..
            "evenly (it must be a multiple of cp_size = %d)", what, n, P, P), 3)
    end
end

-- split(x, dim, group, what) -> this rank's slice of x along dim, contiguous (a copy unless it
-- already is; its gradient lands at the slice's place). `what` names x in the error for an uneven length.
function M.split(x, dim, group, what)
    local _, P, r = info(group)
    if P == 1 then return x end
    local n = x.shape[dim + 1]
    check_len(n, P, what or ("dim " .. dim))
    local len = n / P
    local v = x:narrow(dim, r * len, len)
    local c = v:contiguous()
    if not rawequal(c, v) then free(v) end
    return c
end

-- gather(x, dim, group) -> every rank's x concatenated along dim, in rank order (a new tensor).
function M.gather(x, dim, group)
    local _, P = info(group)
    if P == 1 then return x end
    local st = all_gather_stack(x, group)              -- (P, ..., n, ...)
    local nd = #x.shape
    local perm = {}
    for i = 1, nd do perm[#perm + 1] = i end
    table.insert(perm, dim + 1, 0)                      -- P just before dim
    local p = st:permute(perm)
    local shape = {}
    for i, s in ipairs(x.shape) do shape[i] = s end
    shape[dim + 1] = shape[dim + 1] * P
    local out = p:reshape(shape)
    free(st, p)
    return out
end

-- ==== Ulysses attention ====

-- (B, H, S/P, Dh) (any strides) -> (P, B, H/P, S/P, Dh): chunk j holds head group j
local function to_chunks(x, P)
    local u = x:unflatten(1, {P, -1})                   -- (B, P, H/P, s, Dh)
    local p = u:permute{1, 0, 2, 3, 4}
    local c = p:contiguous()
    free(u)
    if not rawequal(c, p) then free(p) end
    return c
end

-- heads to tokens: (B, H, s, Dh) local tokens, all heads -> (B, H/P, P s, Dh) all tokens, my heads
local function heads_to_tokens(x, group, P)
    local c = to_chunks(x, P)
    local r = all_to_all(c, group)                      -- (P: whose tokens, B, H/P, s, Dh)
    free(c)
    local p = r:permute{1, 2, 0, 3, 4}                  -- (B, H/P, P, s, Dh)
    local s = p.shape
    local out = p:reshape{s[1], s[2], s[3] * s[4], s[5]}
    free(r, p)
    return out
end

-- heads to tokens for q, k and v of one shape at once: one all-to-all of (P, 3, B, H/P, s, Dh)
-- (one collective instead of three: on NCCL a third of the launches and group calls)
local function qkv_heads_to_tokens(q, k, v, group, P)
    local parts = {}
    for i, x in ipairs {q, k, v} do
        local u = x:unflatten(1, {P, -1})              -- (B, P, H/P, s, Dh)
        parts[i] = u:permute{1, 0, 2, 3, 4}            -- (P, B, H/P, s, Dh), a view
        free(u)
    end
    local send = F.stack(parts, 1)                     -- (P, 3, B, H/P, s, Dh): the one copy
    free(parts[1], parts[2], parts[3])
    local r = all_to_all(send, group)                  -- (P: whose tokens, 3, B, H/P, s, Dh)
    free(send)
    local outs = {}
    for i = 1, 3 do
        local sel = r:select(1, i - 1)                 -- (P, B, H/P, s, Dh)
        local p = sel:permute{1, 2, 0, 3, 4}           -- (B, H/P, P, s, Dh)
        local sh = p.shape
        outs[i] = p:reshape{sh[1], sh[2], sh[3] * sh[4], sh[5]}
        free(sel, p)
    end
    free(r)
    return outs[1], outs[2], outs[3]
end

-- tokens to heads: (B, H/P, P s, Dh) -> (B, H, s, Dh)
local function tokens_to_heads(o, group, P)
    local B, Hp, S, Dh = o.shape[1], o.shape[2], o.shape[3], o.shape[4]
    local u = o:reshape{B, Hp, P, S / P, Dh}
    local p = u:permute{2, 0, 1, 3, 4}                  -- (P: whose tokens, B, H/P, s, Dh)
    local c = p:contiguous()
    free(u)
    if not rawequal(c, p) then free(p) end
    local r = all_to_all(c, group)                      -- (P: whose heads, B, H/P, s, Dh)
    free(c)
    local q = r:permute{1, 0, 2, 3, 4}                  -- (B, P, H/P, s, Dh)
    local out = q:reshape{B, Hp * P, S / P, Dh}
    free(r, q)
    return out
end

-- attention(q, k, v, group) -> (B, H, S_q/P, Dh): scaled dot-product attention of this rank's
-- queries over every rank's keys and values (q, k, v are (B, H, S/P, Dh), this rank's tokens).
-- With a group of one rank it is F.scaled_dot_product_attention.
function M.attention(q, k, v, group)
    local g, P = info(group)
    if P == 1 then return F.scaled_dot_product_attention(q, k, v) end
    local H = q.shape[2]
    if H % P ~= 0 or k.shape[2] ~= H or v.shape[2] ~= H then
        error(string.format("context parallelism: the attention has %d heads, which the cp group of %d ranks " ..
            "cannot share out (Ulysses gives each rank H / cp_size heads: the head count must be a multiple of " ..
            "cp_size)", H, P), 2)
    end
    local qa, ka, va
    local same = #q.shape == #k.shape and #q.shape == #v.shape and q.dtype == k.dtype and q.dtype == v.dtype
    for d = 1, #q.shape do same = same and q.shape[d] == k.shape[d] and q.shape[d] == v.shape[d] end
    if same then
        qa, ka, va = qkv_heads_to_tokens(q, k, v, g, P)
    else   -- keys and values of another length (or dtype): one exchange each
        qa, ka, va = heads_to_tokens(q, g, P), heads_to_tokens(k, g, P), heads_to_tokens(v, g, P)
    end
    local o = F.scaled_dot_product_attention(qa, ka, va)
    free(qa, ka, va)
    local out = tokens_to_heads(o, g, P)
    free(o)
    return out
end

-- enable(model, group, is_attention): set (or with group nil, clear) the cp group on the model and
-- on each of its modules for which is_attention(module) holds (a class, or a predicate). A group
-- of one rank clears it: nothing is split.
function M.enable(model, group, is_attention)
    local class = require "nemo.class"
    if group ~= nil and not (type(group) == "table" and getmetatable(group) == dist.Group) then
        error("enable_context_parallel: expected a nemo.dist group (e.g. mesh:get_group('cp')) or nil, got " ..
            type(group), 3)
    end
    if group ~= nil and group:size() == 1 then group = nil end
    local pred = is_attention
    if type(pred) ~= "function" then pred = function(m) return class.isinstance(m, is_attention) end end
    rawset(model, "_cp_group", group)
    for _, m in model:named_modules() do
        if pred(m) then rawset(m, "_cp_group", group) end
    end
end

-- The cp group a model runs with, or nil.
function M.group_of(model) return rawget(model, "_cp_group") end

return M
