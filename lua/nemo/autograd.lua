-- lua/nemo/autograd.lua: the tape. Ops record a node per output while grad mode is on;
-- backward walks the nodes in reverse topological order.
--
-- A node is a plain table: {bw = <static backward function>, next = {edge...}, need = {bool...},
-- name = "mul", plus op-specific fields}. An edge is the input's node, the input itself when it
-- is a leaf that requires grad (gradient accumulates into .grad), or false. Nodes never hold
-- their inputs, only what the op saved with save(): saved tensors are separate engine handles
-- that backward releases as soon as the node has run, so activation memory goes back to the
-- engine during backward instead of waiting for Lua's garbage collector.
--
-- bw(node, g) returns one gradient per input (nil where none is needed or it is zero), or a
-- partial gradient (M.partial) for a sub-view: the pieces are written into one tensor when
-- the input's node runs, instead of a zero tensor of the input's shape per sub-view, summed.
-- Gradients that backward made itself are freed as soon as they are used (in-place sums when a
-- sum's first operand is exclusively ours), so activation-sized temporaries do not wait for
-- Lua's garbage collector.
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local C = nffi.C

local M = {}

local grad_enabled = true

function M.is_grad_enabled() return grad_enabled end
function M.set_grad_enabled(on) local old = grad_enabled; grad_enabled = not not on; return old end

-- Run fn(...) with grad mode set to `on`, restoring it even when fn raises.
local function with_grad_mode(on, fn, ...)
    local old = grad_enabled
    grad_enabled = on
    local res = {pcall(fn, ...)}
    grad_enabled = old
    if not res[1] then error(res[2], 0) end
    return unpack(res, 2, table.maxn(res))
end
function M.no_grad(fn, ...) return with_grad_mode(false, fn, ...) end
function M.enable_grad(fn, ...) return with_grad_mode(true, fn, ...) end

local Tensor   -- set by tensor.lua (avoids a require cycle)
-- Nodes are numbered as they are created; backward runs them from the newest to the oldest
-- (a valid reverse topological order, as in PyTorch), so a recomputed segment of the graph
-- (gradient checkpointing) runs its nodes in the same relative order as the original did.
local seq = 0
function M._set_tensor_class(cls) Tensor = cls end

-- Make a node for an op with inputs ... and output `out` when any input requires grad and grad
-- mode is on; returns the node (the op then stores what backward needs) or nil.
function M.node(name, bw, out, ...)
    if not grad_enabled then return nil end
    local n = select("#", ...)
    local any = false
    for i = 1, n do
        local x = select(i, ...)
        if type(x) == "table" and x.requires_grad then any = true; break end
    end
    if not any then return nil end
    local nxt, need = {}, {}
    for i = 1, n do
        local x = select(i, ...)
        if type(x) == "table" and x.requires_grad then
            nxt[i] = x.grad_fn or x
            need[i] = true
        else
            nxt[i] = false
            need[i] = false
        end
    end
    seq = seq + 1
    local node = {name = name, bw = bw, next = nxt, need = need, nin = n, seq = seq}
    if out then
        out.requires_grad = true
        out.grad_fn = node
    end
    return node
end

-- Attach node as grad_fn of an additional output (ops with one node per output use node()).
function M.attach(node, out) out.requires_grad = true; out.grad_fn = node end

-- Keep a tensor for backward: a separate engine handle, released right after the node runs.
function M.save(node, t)
    if t == nil then return nil end
    local h = Tensor.wrap(C.nemo_tensor_alias(t._c))
    local saved = node.saved
    if not saved then saved = {}; node.saved = saved end
    saved[#saved + 1] = h
    return h
end

local function release_saved(node)
    local saved = node.saved
    if saved then
        for i = 1, #saved do saved[i]:free() end
        node.saved = nil
    end
    node.freed = true
end

-- Accumulate a gradient into a leaf's .grad. g may be shared with other consumers, so the
-- first gradient is copied (unless the caller owns it) and later ones are added in place.
local Contributions = {}

-- Returns true when the leaf kept g itself (the caller must not free it then).
local function accumulate_leaf(leaf, g, owned)
    local conv = nil                 -- a dtype conversion made here
    if g.dtype ~= leaf.dtype then conv = g:to{dtype = leaf.dtype}; g = conv; owned = true end
    -- a view of another gradient is not ours to add into, whatever the caller thinks
    owned = owned and g._c.storage.refcount == 1 and g._c.refcount == 1
    local kept = false               -- the leaf keeps g itself
    local sink = rawget(leaf, "_sink")
    local cur = rawget(leaf, "grad")
    if sink then
        if owned then sink[#sink + 1] = g; kept = true else sink[#sink + 1] = g:clone() end
    elseif cur == nil then
        if owned and g:is_contiguous() then leaf.grad = g; kept = true else leaf.grad = g:clone() end
        leaf._grad_owned = true
    elseif rawget(leaf, "_grad_owned") then
        nffi.check(C.nemo_binary_(cur._c, g._c, C.NEMO_BOP_ADD, 1.0))
    else
        leaf.grad = cur:detach() + g:detach()
        leaf._grad_owned = true
    end
    if conv and not kept then conv:free() end
    local hooks = rawget(leaf, "_post_accumulate_hooks")
    if hooks then for i = 1, #hooks do hooks[i](leaf) end end
    return kept and not conv
end

-- true when t is the only handle on its storage (nothing else can see an in-place change)
local function exclusive(t)
    local c = t._c
    return c.refcount == 1 and c.storage.refcount == 1 and C.nemo_tensor_is_contiguous(c) ~= 0
end

-- a + b as a new tensor, or a += b in place when a is exclusively ours (excl: no other holder in
-- backward, one handle on its storage, same shape and dtype as the sum): the same bits, one
-- allocation less.
local function add_grads(a, b, excl)
    local ac, bc = a._c, b._c
    if excl and ac.refcount == 1 and ac.storage.refcount == 1 and ac.dtype == bc.dtype and ac.ndim == bc.ndim
            and bc.storage ~= ac.storage and C.nemo_tensor_is_contiguous(ac) ~= 0 then
        local same = true
        for d = 0, ac.ndim - 1 do if ac.shape[d] ~= bc.shape[d] then same = false; break end end
        if same then
            nffi.check(C.nemo_binary_(ac, bc, C.NEMO_BOP_ADD, 1.0))
            return a
        end
    end
    return Tensor.wrap(C.nemo_binary(ac, bc, C.NEMO_BOP_ADD, 1.0, -1))
end

-- ==== Partial gradients of sub-views ====
-- M.partial(shape, apply, spec, g): the gradient of a sub-view of a tensor of `shape`: g inside
-- the view that apply(t, spec) cuts out of t, zero elsewhere. The partial takes its own handle
-- on g. Partials for one input merge; a dense gradient for the same input takes the pieces in
-- place when it is exclusively ours. materialize() writes the pieces into one tensor: pieces
-- that tile the input along one dim (split, chunk, unbind, a cat's parts) need no zero fill;
-- one piece covering everything is g itself.
local Partial = {}
Partial.__index = Partial

function M.partial(shape, apply, spec, g)
    local h = Tensor.wrap(C.nemo_tensor_alias(g._c))
    return setmetatable({shape = shape, pieces = {{apply = apply, spec = spec, g = h}}}, Partial)
end
function Partial:free()
    for _, pc in ipairs(self.pieces) do pc.g:free() end
    self.pieces = {}
end
local function is_partial(x) return getmetatable(x) == Partial end
M.is_partial = is_partial

-- [start, stop) of a piece along its dim, or nil when it is not a plain interval (stepped slice)
local function interval(spec)
    if spec.index ~= nil then return spec.index, spec.index + 1 end
    if spec.step == 1 then return spec.start, spec.start + spec.len end
    return nil
end

-- true when the pieces cover the whole tensor exactly once along one dim
local function tiles(p)
    local pieces = p.pieces
    local dim = pieces[1].spec.dim
    local iv = {}
    for i, pc in ipairs(pieces) do
        if pc.spec.dim ~= dim then return false end
        local a, b = interval(pc.spec)
        if a == nil then return false end
        iv[i] = {a, b}
    end
    table.sort(iv, function(x, y) return x[1] < y[1] end)
    local at = 0
    for _, v in ipairs(iv) do
        if v[1] ~= at then return false end
        at = v[2]
    end
    return at == p.shape[dim + 1]
end

local function same_dims(t, shape)
    local c = t._c
    if c.ndim ~= #shape then return false end
    for d = 1, #shape do if c.shape[d - 1] ~= shape[d] then return false end end
    return true
end

-- add (or copy) a piece into its view of dst
local function put(dst, pc, add)
    local v = pc.apply(dst, pc.spec)
    if add then nffi.check(C.nemo_binary_(v._c, pc.g._c, C.NEMO_BOP_ADD, 1.0))
    else nffi.check(C.nemo_copy_(v._c, pc.g._c)) end
    v:free()
end

-- The dense gradient of a partial (a new tensor); the partial is consumed.
local function materialize(p)
    local pieces = p.pieces
    local g1 = pieces[1].g
    if #pieces == 1 and same_dims(g1, p.shape) then
        pieces[1].g = nil
        p.pieces = {}
        return g1                              -- the view is the whole tensor
    end
    local dt = g1._c.dtype
    for i = 2, #pieces do dt = Tensor.promote(dt, pieces[i].g._c.dtype) end
    local opts = {dtype = Tensor.dtype_names[dt], device = g1.device}
    local out
    if tiles(p) then
        out = Tensor.empty(p.shape, opts)
        for _, pc in ipairs(pieces) do put(out, pc, false) end
    else
        out = Tensor.zeros(p.shape, opts)
        for i, pc in ipairs(pieces) do put(out, pc, i > 1) end
    end
    p:free()
    return out
end
M._materialize = materialize

-- The nodes reachable from root, oldest first (backward walks the list from the end).
local function by_seq(a, b) return a.seq < b.seq end
local function toposort(root)
    local order, seen = {root}, {[root] = true}
    local i = 1
    while i <= #order do
        local node = order[i]
        local nxt = node.next
        for k = 1, node.nin do
            local e = nxt[k]
            if e and e.bw and not seen[e] then
                seen[e] = true
                order[#order + 1] = e
            end
        end
        i = i + 1
    end
    table.sort(order, by_seq)
    return order
end

-- Backward from tensor `root` with upstream gradient `grad` (a tensor of root's shape).
-- How many backward passes are running (a checkpointed segment's backward runs inside the
-- outer one): parallel managers tell a recomputation inside backward from a new forward.
local backward_depth = 0
function M.in_backward() return backward_depth > 0 end

function M.backward(root, grad)
    local fn = rawget(root, "grad_fn")
    if fn == nil then
        if rawget(root, "requires_grad") then return accumulate_leaf(root, grad, false) end
        error("backward: the tensor does not require grad and has no grad_fn", 3)
    end
    local order = toposort(fn)
    local grads = {[fn] = grad}
    -- Gradients waiting in `grads` are counted so that each is freed as soon as its last
    -- consumer has run (the same tensor may wait for several nodes when a backward passes
    -- its input gradient through). The caller's grad and retained grads are never freed.
    local refs = {[grad] = math.huge}
    local function hold(t) refs[t] = (refs[t] or 0) + 1 end
    local function drop(t)
        local n = (refs[t] or 1) - 1
        if n <= 0 then refs[t] = nil; t:free() else refs[t] = n end
    end
    local prev = grad_enabled
    grad_enabled = false     -- backward itself records nothing (no double backward yet)
    backward_depth = backward_depth + 1
    local ok, err = pcall(function()
        for k = #order, 1, -1 do
            local node = order[k]
            local g = grads[node]
            grads[node] = nil
            if node.freed then
                error("backward: trying to backward through the graph a second time (node " ..
                    node.name .. "); its saved tensors were already freed", 0)
            end
            if g ~= nil and is_partial(g) then
                local d = materialize(g)
                refs[g] = nil
                refs[d] = 1
                g = d
            end
            if g ~= nil then
                if node.retain then node.retain.grad = g; refs[g] = math.huge end
                local outs = {node.bw(node, g)}
                local nxt = node.next
                for i = 1, node.nin do
                    local gi = outs[i]
                    local e = nxt[i]
                    -- a backward may hand several contributions for one input, to be added in
                    -- order (checkpointed segments do, so sums associate as without them)
                    local list
                    if gi ~= nil and getmetatable(gi) == Contributions then list = gi; gi = list[1] end
                    local k = 1
                    while gi ~= nil and e do
                        -- gi is shared if it is the incoming gradient, waits elsewhere, or is
                        -- handed out again; otherwise this loop owns it and frees it when done
                        local shared = rawequal(gi, g) or refs[gi] ~= nil
                        for j = 1, node.nin do
                            if j ~= i and rawequal(outs[j], gi) then shared = true end
                        end
                        local cur = e.bw and grads[e] or nil
                        if is_partial(gi) and (not e.bw or (cur ~= nil and not is_partial(cur) and
                                not (refs[cur] == 1 and exclusive(cur)))) then
                            gi = materialize(gi)       -- a leaf, or a shared dense sum: make it dense
                        end
                        if e.bw then
                            if cur == nil then
                                grads[e] = gi
                                hold(gi)
                            elseif is_partial(gi) then
                                if is_partial(cur) then                   -- merge the pieces
                                    for _, pc in ipairs(gi.pieces) do cur.pieces[#cur.pieces + 1] = pc end
                                    gi.pieces = {}
                                else                                      -- into cur, in place
                                    for _, pc in ipairs(gi.pieces) do put(cur, pc, true) end
                                    gi:free()
                                end
                            else
                                if is_partial(cur) then
                                    local d = materialize(cur)
                                    refs[d] = refs[cur]
                                    refs[cur] = nil
                                    grads[e] = d
                                    cur = d
                                end
                                local sum = add_grads(cur, gi, refs[cur] == 1)
                                if not rawequal(sum, cur) then
                                    grads[e] = sum
                                    hold(sum)
                                    drop(cur)
                                end
                                if not shared then gi:free() end
                            end
                        else
                            if not accumulate_leaf(e, gi, not shared) and not shared then gi:free() end
                        end
                        k = k + 1
                        gi = list and list[k] or nil
                    end
                end
                drop(g)
            end
            release_saved(node)
            -- a checkpoint or parallel hook may ask to run Lua between nodes
            if node.after then node.after(node) end
        end
    end)
    grad_enabled = prev
    backward_depth = backward_depth - 1
    if not ok then error(err, 0) end
end

-- ==== Gradient checkpointing ====
-- checkpoint(fn, ...) runs fn(...) without keeping its activations; backward runs fn again with
-- grad on (same RNG state) and backpropagates through the recomputed segment. fn returns a
-- tensor or a list of tensors. Parameters used inside fn receive their gradients during that
-- recomputation; gradients of the tensor arguments are handed to the outer graph one
-- contribution at a time, so the sums associate exactly as without checkpointing (bitwise
-- equal gradients on CPU).
-- checkpoint_owned(fn, ...) is the same for an fn whose outputs are tensors it made and that
-- nothing else holds (a transformer block's outputs): the checkpoint then takes a single output
-- as its buffer without a copy, frees several outputs as soon as they are copied into its
-- buffer, and frees the recomputed outputs after the recomputation's backward, so their memory
-- does not wait for the garbage collector.
local function flatten_outputs(outs)
    local flat = {}
    for i, o in ipairs(outs) do flat[i] = o:reshape(-1) end
    if #flat == 1 then return flat[1] end
    local buf = require("nemo.functional").cat(flat, 0)
    for i = 1, #flat do flat[i]:free() end     -- views (or copies) made here
    return buf
end

local function free_outputs(outs, args, n)
    for _, o in ipairs(outs) do
        local keep = false
        for i = 1, n do if rawequal(o, args[i]) then keep = true end end
        if not keep then o:free() end
    end
end

local function checkpoint_bw(node, g)
    local args, n = {}, node.nargs
    local sinks = {}
    local made = {}
    for i = 1, n do
        local a = node.args[i]
        if node.is_tensor[i] then
            local d = a:detach()
            made[#made + 1] = d
            if node.need[i] then
                d.requires_grad = true
                sinks[i] = {}
                rawset(d, "_sink", sinks[i])
            end
            args[i] = d
        else
            args[i] = a
        end
    end
    local gen = node.generator
    local saved_state = gen and gen:get_state()
    if gen then gen:set_state(node.rng_state) end
    local prev = grad_enabled
    grad_enabled = true
    local outs
    local ok, res = pcall(node.fn, unpack(args, 1, n))
    if ok then
        outs = Tensor.is_tensor(res) and {res} or res
        ok, res = pcall(flatten_outputs, outs)
    end
    grad_enabled = prev
    if gen then gen:set_state(saved_state) end
    if not ok then error(res, 0) end
    if res.requires_grad then M.backward(res, g) end
    -- the recomputed segment is done: release what was made for it now, not at the next collection
    res:free()
    if node.owned then free_outputs(outs, args, n) end
    for _, d in ipairs(made) do d:free() end
    local grads = {}
    for i = 1, n do
        local s = sinks[i]
        if s and #s > 0 then grads[i] = setmetatable(s, Contributions) end
    end
    return unpack(grads, 1, n)
end

local function checkpoint(owned, fn, ...)
    if not grad_enabled then return fn(...) end
    local n = select("#", ...)
    local args, is_t = {...}, {}
    for i = 1, n do is_t[i] = Tensor.is_tensor(args[i]) end
    local gen = Tensor.default_generator
    local rng_state = gen:get_state()
    local res = M.no_grad(fn, ...)
    local single = Tensor.is_tensor(res)
    local outs = single and {res} or res
    local buf = flatten_outputs(outs)
    if #outs == 1 then
        -- one output: the buffer is a view of it when fn made it (owned) and it shares no memory
        -- with an argument; otherwise a copy, so the outputs never alias fn's state
        local copy = not owned
        for i = 1, n do
            if is_t[i] and args[i]._c.storage == buf._c.storage then copy = true end
        end
        if copy then
            local c = buf:clone()
            buf:free()
            buf = c
        end
    end
    -- the node: inputs are the tensor arguments; it always records, since parameters used
    -- inside fn may require grad even when no argument does
    seq = seq + 1
    local nxt, need = {}, {}
    for i = 1, n do
        local a = args[i]
        if is_t[i] and a.requires_grad then nxt[i] = a.grad_fn or a; need[i] = true
        else nxt[i] = false; need[i] = false end
    end
    local node = {name = "checkpoint", bw = checkpoint_bw, next = nxt, need = need, nin = n, seq = seq,
                  fn = fn, nargs = n, is_tensor = is_t, generator = gen, rng_state = rng_state, args = {},
                  owned = owned}
    for i = 1, n do node.args[i] = is_t[i] and M.save(node, args[i]) or args[i] end
    buf.requires_grad = true
    buf.grad_fn = node
    -- hand back views of the buffer with the outputs' shapes
    local views, off = {}, 0
    for i, o in ipairs(outs) do
        local k = o:numel()
        local piece = buf:narrow(0, off, k)
        views[i] = piece:view(o.shape)
        piece:free()
        off = off + k
    end
    -- the views' nodes lead to the checkpoint node; the buffer's own handle is not needed, and
    -- would keep the block's outputs alive through the whole backward until a collection
    buf:free()
    if owned then free_outputs(outs, args, n) end
    if single then return views[1] end
    return views
end

function M.checkpoint(fn, ...) return checkpoint(false, fn, ...) end
function M.checkpoint_owned(fn, ...) return checkpoint(true, fn, ...) end

return M
