-- lua/nemo/parallel/ddp.lua: DistributedDataParallel as a parallel manager (Automodel's
-- DDPManager). parallelize(model) broadcasts rank 0's parameters and buffers, then averages
-- gradients over the data-parallel group in buckets while backward still runs:
--
--   local ddp = require("nemo.parallel.ddp").DDPManager{bucket_cap_mb = 25}
--   ddp:parallelize(model)                        -- the model is hooked in place and returned
--   for each optimizer step:
--       for i, micro in ipairs(micro_batches) do
--           ddp:set_requires_gradient_sync(i == #micro_batches)   -- or ddp:no_sync(fn)
--           (loss(model, micro) / #micro_batches):backward()
--       end
--       ddp:finish_gradient_synchronization()     -- the final wait, before clipping / step
--       optimizer:step(); optimizer:zero_grad()
--
-- How it works: parameters that require grad are packed, in reverse registration order (the
-- order backward produces their gradients), into flat float32 buckets (float64 for float64
-- parameters) of at most bucket_cap_mb (the first one 1 MiB, so communication starts early).
-- Each parameter's post-accumulate-grad hook counts its gradient contributions; when every
-- parameter of a bucket has all of its contributions, the bucket's gradients are copied into
-- the flat buffer and an asynchronous all-reduce (average) starts, while backward continues;
-- later hooks drive MPI's progress. finish_gradient_synchronization starts what is left,
-- waits for everything and copies the averages back into .grad (rounded once to the
-- parameter's dtype).
--
-- Non-obvious rules:
-- - Buckets start strictly in index order on every rank (MPI matches collectives by order).
-- - How many contributions a parameter gets per backward (a weight used twice gets two) is
--   learned: the first synchronized backward starts every bucket at the end; later ones start
--   a bucket as soon as its counts are reached.
-- - The last bucket always starts in finish and carries, after the gradients, one flag per
--   bucket ("a contribution arrived after I started": the graph changed) and one per
--   parameter ("I have a gradient"). Flagged buckets are reduced again, so a changing graph
--   costs time, never correctness; a parameter no rank has a gradient for keeps .grad nil
--   (as without DDP), one some ranks lack gets their zeros in the average.
-- - Under no_sync / set_requires_gradient_sync(false) gradients only accumulate locally; the
--   next synchronized backward reduces the accumulated sum.
-- - A forward with grad on while a synchronized backward has not been finished is an error
--   (it would otherwise step the optimizer on unsynchronized gradients).
-- - find_unused_parameters, static_graph, gradient_as_bucket_view and broadcast_buffers are
--   accepted for config compatibility and change nothing: unused parameters are handled as
--   above, gradients are copied into the buckets, and buffers are broadcast once at
--   parallelize (Automodel runs DDP with broadcast_buffers=False).
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"
local dist = require "nemo.dist"

local C = nffi.C
local check = nffi.check

local M = {}

local DDP = {}
DDP.__index = DDP
M.DDPManagerClass = DDP

-- Options the ddp manager takes (Automodel's ddp block, plus nemo-lua's group).
M.OPTIONS = {
    dp_size = "number", dp_replicate_size = "number", tp_size = "number", cp_size = "number", pp_size = "number",
    ep_size = "number", activation_checkpointing = "boolean", find_unused_parameters = "boolean",
    bucket_cap_mb = "number", gradient_as_bucket_view = "boolean", broadcast_buffers = "boolean",
    static_graph = "boolean", group = "table",
}
local FIRST_BUCKET_BYTES = 2 ^ 20

local wrapped = setmetatable({}, {__mode = "k"})   -- models that already have a manager

local function sorted_keys(t)
    local k = {}
    for n in pairs(t) do k[#k + 1] = n end
    table.sort(k)
    return k
end

local now = C.nemo_coll_wtime

-- DDPManager(opts): checks the options; parallelize(model) does the work.
function M.DDPManager(opts)
    opts = opts or {}
    if type(opts) ~= "table" then error("DDPManager: options must be a table", 2) end
    for k, v in pairs(opts) do
        local want = M.OPTIONS[k]
        if want == nil then
            error(string.format("DDPManager: unknown option '%s' (known: %s)", tostring(k),
                table.concat(sorted_keys(M.OPTIONS), ", ")), 2)
        end
        if type(v) ~= want and type(v) ~= "userdata" then
            error(string.format("DDPManager: %s must be a %s, got %s", k, want, type(v)), 2)
        end
    end
    for _, k in ipairs { "tp_size", "cp_size", "pp_size", "ep_size" } do
        local v = opts[k]
        if type(v) == "number" and v > 1 then
            error(string.format("DDPManager: ddp does not support %s > 1 (got %d): DDP replicates the whole model " ..
                "on every rank", k, v), 2)
        end
    end
    if type(opts.dp_replicate_size) == "number" and opts.dp_replicate_size > 1 then
        error("DDPManager: dp_replicate_size is an FSDP2 (HSDP) option; with ddp every rank is a replica " ..
              "(leave it out or set it to 1)", 2)
    end
    local cap = opts.bucket_cap_mb or 25
    if type(cap) ~= "number" or cap <= 0 then
        error("DDPManager: bucket_cap_mb must be a positive number, got " .. tostring(cap), 2)
    end
    return setmetatable({opts = opts, bucket_bytes = cap * 2 ^ 20, sync = true, manager_type = "ddp",
                         last = {}}, DDP)
end

-- ==== setup ====

local function broadcast_tensor(g, t)
    if t:is_contiguous() then
        check(C.nemo_coll_broadcast(g._c, t._c, 0))
    else
        local tmp = Tensor.wrap(C.nemo_contiguous(t._c))
        check(C.nemo_coll_broadcast(g._c, tmp._c, 0))
        check(C.nemo_copy_(t._c, tmp._c))
        tmp:free()
    end
end

function DDP:_build_buckets()
    local params = self.params
    local buckets = {}
    local cur
    for i = #params, 1, -1 do
        local p = params[i]
        local rdt = p.dtype == "float64" and "float64" or "float32"
        local esz = rdt == "float64" and 8 or 4
        local n = p:numel()
        local cap = #buckets <= 1 and math.min(FIRST_BUCKET_BYTES, self.bucket_bytes) or self.bucket_bytes
        if not cur or cur.dtype ~= rdt or cur.device ~= p.device or (cur.numel > 0 and (cur.numel + n) * esz > cap) then
            cur = {dtype = rdt, device = p.device, members = {}, numel = 0}
            buckets[#buckets + 1] = cur
        end
        cur.members[#cur.members + 1] = i
        cur.numel = cur.numel + n
    end
    local K, P = #buckets, #params
    self.bucket_of = {}
    self.bytes_per_step = 0
    for b, bk in ipairs(buckets) do
        local extra = b == K and (K + P) or 0
        bk.buf = Tensor.zeros({bk.numel + extra}, {dtype = bk.dtype, device = bk.device})
        bk.views = {}
        local off = 0
        for j, i in ipairs(bk.members) do
            local p = params[i]
            local n = p:numel()
            bk.views[j] = bk.buf:narrow(0, off, n):view(p.shape)
            off = off + n
            self.bucket_of[i] = b
        end
        if extra > 0 then
            if bk.device ~= "cpu" then
                bk.meta_host = Tensor.zeros({extra}, {dtype = bk.dtype})
                bk.meta_dev = bk.buf:narrow(0, bk.numel, extra)
            else
                bk.meta_host = bk.buf:narrow(0, bk.numel, extra)
            end
            bk.meta = ffi.cast(bk.dtype == "float64" and "double *" or "float *", C.nemo_tensor_data(bk.meta_host._c))
        end
        self.bytes_per_step = self.bytes_per_step + (bk.numel + extra) * (bk.dtype == "float64" and 8 or 4)
    end
    self.buckets = buckets
end

-- Rank 0's parameters and buffers everywhere (trainable parameters through the buckets, one
-- collective per bucket; the rest one by one).
function DDP:_broadcast_state(model)
    local g, rank = self.group, self.group:rank()
    for _, bk in ipairs(self.buckets) do
        if rank == 0 then
            for j, i in ipairs(bk.members) do check(C.nemo_copy_(bk.views[j]._c, self.params[i]._c)) end
        end
        check(C.nemo_coll_broadcast(g._c, bk.buf._c, 0))
        if rank ~= 0 then
            for j, i in ipairs(bk.members) do check(C.nemo_copy_(self.params[i]._c, bk.views[j]._c)) end
        end
    end
    local inbucket = {}
    for _, p in ipairs(self.params) do inbucket[p] = true end
    for _, p in model:named_parameters() do
        if not inbucket[p] then broadcast_tensor(g, p); inbucket[p] = true end
    end
    for _, b in model:named_buffers() do broadcast_tensor(g, b) end
end

function DDP:_reset_step()
    local st = self.step
    local P, K = #self.params, #self.buckets
    st.seen = 0
    st.next = 1
    st.inflight = 0
    st.early = 0
    for i = 1, P do st.count[i] = 0 end
    for b = 1, K do
        st.launched[b] = false
        st.redo[b] = false
        local n = 0
        for _, i in ipairs(self.buckets[b].members) do
            local e = self.expected[i]
            if e == nil then n = math.huge elseif e > 0 then n = n + 1 end   -- learned unused: no wait
        end
        st.pending[b] = n
    end
end

-- parallelize(model) -> model, hooked in place.
function DDP:parallelize(model)
    if self.module then error("DDPManager:parallelize: this manager already runs a model", 2) end
    if wrapped[model] then error("DDPManager:parallelize: the model already has a DDP manager", 2) end
    if not dist.is_initialized() then
        error("DDPManager:parallelize: needs an initialized process group (call nemo.dist.init_process_group() first)", 2)
    end
    local g = self.opts.group or dist.group_world()
    self.group = g
    self.world = g:size()
    if self.opts.dp_size and self.opts.dp_size ~= self.world then
        error(string.format("DDPManager: dp_size = %d does not match the data-parallel group's size %d",
            self.opts.dp_size, self.world), 2)
    end
    if self.opts.activation_checkpointing and model.enable_gradient_checkpointing then
        model:enable_gradient_checkpointing()
    end
    self.module = model
    wrapped[model] = self
    local params, names = {}, {}
    for name, p in model:named_parameters() do
        if rawget(p, "requires_grad") then
            params[#params + 1] = p
            names[#names + 1] = name
        end
    end
    self.params, self.names = params, names
    if self.world == 1 or #params == 0 then return model end
    self:_build_buckets()
    self:_broadcast_state(model)
    self.expected = {}
    self.step = {count = {}, launched = {}, redo = {}, pending = {}}
    self:_reset_step()
    for i, p in ipairs(params) do
        p:register_post_accumulate_grad_hook(function() self:_on_grad(i) end)
    end
    -- the check that a synchronized backward was finished before the next forward
    local forward = model.forward
    rawset(model, "forward", function(m, ...)
        if self.sync and self.step.seen > 0 and autograd.is_grad_enabled() then
            error("DDP: the gradients of the previous backward were not synchronized; call " ..
                  "finish_gradient_synchronization() on the DDP manager after the last backward of a step " ..
                  "(before clipping and optimizer:step())", 2)
        end
        return forward(m, ...)
    end)
    return model
end

-- ==== during backward ====

function DDP:_launch(b)
    local bk = self.buckets[b]
    local params = self.params
    local st = self.step
    for j, i in ipairs(bk.members) do
        local gr = rawget(params[i], "grad")
        if gr ~= nil then check(C.nemo_copy_(bk.views[j]._c, gr._c))
        else check(C.nemo_fill_(bk.views[j]._c, 0)) end
    end
    if bk.meta then
        local K, m = #self.buckets, bk.meta
        for k = 1, K do m[k - 1] = st.redo[k] and 1 or 0 end
        for i = 1, #params do m[K + i - 1] = rawget(params[i], "grad") ~= nil and 1 or 0 end
        if bk.meta_dev then check(C.nemo_copy_(bk.meta_dev._c, bk.meta_host._c)) end
    end
    local w = C.nemo_coll_all_reduce_async(self.group._c, bk.buf._c, C.NEMO_COLL_AVG)
    if w == nil then nffi.raise() end
    bk.work = w
    st.launched[b] = true
    st.inflight = st.inflight + 1
end

function DDP:_on_grad(i)
    if not self.sync then return end
    local st = self.step
    st.seen = st.seen + 1
    local c = st.count[i] + 1
    st.count[i] = c
    local b = self.bucket_of[i]
    if st.launched[b] then
        st.redo[b] = true                     -- a contribution after the bucket started
    elseif c == self.expected[i] then
        st.pending[b] = st.pending[b] - 1
    end
    local K = #self.buckets
    while st.next < K and st.pending[st.next] == 0 do   -- start ready buckets, in order
        self:_launch(st.next)
        st.early = st.early + 1
        st.next = st.next + 1
    end
    if st.inflight > 0 and C.nemo_coll_progress() < 0 then nffi.raise() end
end

-- ==== after backward ====

local function wait_free(w)
    local rc = C.nemo_coll_wait(w)
    if rc < 0 then
        local msg = ffi.string(C.nemo_last_error())
        error("DDP gradient all-reduce: " .. msg, 0)
    end
    C.nemo_coll_work_free(w)
end

-- The final wait: start the buckets not started yet, wait for all, write the averaged
-- gradients into .grad. Call it after the last backward of an optimizer step (it does nothing
-- under no_sync, or on one rank).
function DDP:finish_gradient_synchronization()
    if not self.buckets or not self.sync then return end
    local t0 = now()
    local st, buckets, params = self.step, self.buckets, self.params
    local K, P = #buckets, #params
    for b = st.next, K do self:_launch(b) end
    st.next = K + 1
    for b = 1, K do                           -- wait in start order
        wait_free(buckets[b].work)
        buckets[b].work = nil
    end
    st.inflight = 0
    local last = buckets[K]
    if last.meta_dev then check(C.nemo_copy_(last.meta_host._c, last.meta_dev._c)) end
    local m = last.meta
    local redo = 0
    for b = 1, K - 1 do
        if m[b - 1] > 0 then
            -- the graph changed: reduce this bucket again from the complete local gradients
            st.launched[b] = false
            self:_launch(b)
            wait_free(buckets[b].work)
            buckets[b].work = nil
            st.inflight = 0
            redo = redo + 1
        end
    end
    for _, bk in ipairs(buckets) do
        for j, i in ipairs(bk.members) do
            if m[K + i - 1] > 0 then
                local p = params[i]
                local gr = rawget(p, "grad")
                if gr ~= nil and rawget(p, "_grad_owned") then
                    check(C.nemo_copy_(gr._c, bk.views[j]._c))
                else
                    local ng = Tensor.empty(p.shape, {dtype = p.dtype, device = p.device})
                    check(C.nemo_copy_(ng._c, bk.views[j]._c))
                    p.grad = ng
                    rawset(p, "_grad_owned", true)
                end
            end
        end
    end
    for i = 1, P do   -- learn: the most contributions seen per backward (0: unused so far)
        local c = st.count[i]
        if (self.expected[i] or -1) < c then self.expected[i] = c end
    end
    self.last = {buckets = K, early = st.early, redo = redo, bytes = self.bytes_per_step * (1 + redo / K),
                 finish_seconds = now() - t0}
    self:_reset_step()
end
DDP.wait = DDP.finish_gradient_synchronization

-- ==== gradient sync switches ====

function DDP:set_requires_gradient_sync(on) self.sync = not not on end

-- no_sync(fn, ...): run fn with gradient synchronization off (gradient accumulation steps).
function DDP:no_sync(fn, ...)
    local old = self.sync
    self.sync = false
    local res = {pcall(fn, ...)}
    self.sync = old
    if not res[1] then error(res[2], 0) end
    return unpack(res, 2, table.maxn(res))
end

-- Facts about the buckets and the last finished step: {buckets, params, bytes_per_step,
-- last = {early (buckets started during backward), redo, bytes, finish_seconds}}.
function DDP:info()
    return {buckets = self.buckets and #self.buckets or 0, params = self.params and #self.params or 0,
            bytes_per_step = self.bytes_per_step or 0, world = self.world, last = self.last}
end

-- ==== the manager interface the training loop uses (shared with FSDP2) ====

-- What the optimizer updates: the model's trainable parameters, in registration order.
function DDP:parameters()
    local out = {}
    for i, p in ipairs(self.params or {}) do out[i] = p end
    return out
end

-- {{name, tensor}...} of the same.
function DDP:named_parameters()
    local out = {}
    for i, p in ipairs(self.params or {}) do out[i] = {self.names[i], p} end
    return out
end

-- The gradients are identical on every rank after finish_gradient_synchronization, so the
-- local norm is the global one (nemo.optim.clip_grad_norm_).
function DDP:clip_grad_norm_(max_norm, opts)
    return require("nemo.optim").clip_grad_norm_(self.params, max_norm, opts)
end

-- wrap(model, opts) -> manager: DDPManager(opts):parallelize(model), the one-liner.
function M.wrap(model, opts)
    local mgr = M.DDPManager(opts)
    mgr:parallelize(model)
    return mgr
end

return M
