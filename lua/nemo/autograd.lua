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
-- bw(node, g) returns one gradient per input (nil where none is needed or it is zero).
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

local function accumulate_leaf(leaf, g, owned)
    if g.dtype ~= leaf.dtype then g = g:to{dtype = leaf.dtype}; owned = true end
    -- a view of another gradient is not ours to add into, whatever the caller thinks
    owned = owned and g._c.storage.refcount == 1 and g._c.refcount == 1
    local sink = rawget(leaf, "_sink")
    if sink then sink[#sink + 1] = owned and g or g:clone(); return end
    local cur = rawget(leaf, "grad")
    if cur == nil then
        if not owned or not g:is_contiguous() then g = g:clone() end
        leaf.grad = g
        leaf._grad_owned = true
    elseif rawget(leaf, "_grad_owned") then
        nffi.check(C.nemo_binary_(cur._c, g._c, C.NEMO_BOP_ADD, 1.0))
    else
        leaf.grad = cur:detach() + g:detach()
        leaf._grad_owned = true
    end
    local hooks = rawget(leaf, "_post_accumulate_hooks")
    if hooks then for i = 1, #hooks do hooks[i](leaf) end end
end

local function add_grads(a, b) return Tensor.wrap(C.nemo_binary(a._c, b._c, C.NEMO_BOP_ADD, 1.0, -1)) end

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
    local ok, err = pcall(function()
        for k = #order, 1, -1 do
            local node = order[k]
            local g = grads[node]
            grads[node] = nil
            if node.freed then
                error("backward: trying to backward through the graph a second time (node " ..
                    node.name .. "); its saved tensors were already freed", 0)
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
                        if e.bw then
                            local cur = grads[e]
                            if cur then
                                local sum = add_grads(cur, gi)
                                grads[e] = sum
                                hold(sum)
                                drop(cur)
                            else
                                grads[e] = gi
                                hold(gi)
                            end
                        else
                            -- a leaf: g is shared if it is the incoming gradient or repeated
                            local shared = rawequal(gi, g) or refs[gi] ~= nil
                            for j = 1, node.nin do
                                if j ~= i and rawequal(outs[j], gi) then shared = true end
                            end
                            accumulate_leaf(e, gi, not shared)
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
    if not ok then error(err, 0) end
end

-- ==== Gradient checkpointing ====
-- checkpoint(fn, ...) runs fn(...) without keeping its activations; backward runs fn again with
-- grad on (same RNG state) and backpropagates through the recomputed segment. fn returns a
-- tensor or a list of tensors. Parameters used inside fn receive their gradients during that
-- recomputation; gradients of the tensor arguments are handed to the outer graph one
-- contribution at a time, so the sums associate exactly as without checkpointing (bitwise
-- equal gradients on CPU).
local function flatten_outputs(outs)
    local flat = {}
    for i, o in ipairs(outs) do flat[i] = o:reshape(-1) end
    return #flat == 1 and flat[1] or require("nemo.functional").cat(flat, 0)
end

local function checkpoint_bw(node, g)
    local args, n = {}, node.nargs
    local sinks = {}
    for i = 1, n do
        local a = node.args[i]
        if node.is_tensor[i] then
            local d = a:detach()
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
    local ok, res = pcall(node.fn, unpack(args, 1, n))
    if ok then
        local outs = Tensor.is_tensor(res) and {res} or res
        ok, res = pcall(flatten_outputs, outs)
    end
    grad_enabled = prev
    if gen then gen:set_state(saved_state) end
    if not ok then error(res, 0) end
    if res.requires_grad then M.backward(res, g) end
    local grads = {}
    for i = 1, n do
        local s = sinks[i]
        if s and #s > 0 then grads[i] = setmetatable(s, Contributions) end
    end
    return unpack(grads, 1, n)
end

function M.checkpoint(fn, ...)
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
    if buf._c.storage == outs[1]._c.storage and #outs == 1 then buf = buf:clone() end
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
                  fn = fn, nargs = n, is_tensor = is_t, generator = gen, rng_state = rng_state, args = {}}
    for i = 1, n do node.args[i] = is_t[i] and M.save(node, args[i]) or args[i] end
    buf.requires_grad = true
    buf.grad_fn = node
    -- hand back views of the buffer with the outputs' shapes
    local views, off = {}, 0
    for i, o in ipairs(outs) do
        local k = o:numel()
        views[i] = buf:narrow(0, off, k):view(o.shape)
        off = off + k
    end
    if single then return views[1] end
    return views
end

return M
