-- lua/nemo/parallel/fsdp2.lua: fully sharded data parallelism as a parallel manager
-- (Automodel's FSDP2Manager, torch's fully_shard), over nemo.dist collectives:
--
--   local fsdp = require("nemo.parallel.fsdp2").FSDP2Manager{dp_size = 4, dp_replicate_size = 2}
--   fsdp:parallelize(model)                 -- hooked in place; the model is returned
--   local opt = nemo.optim.AdamW(fsdp:parameters(), {lr = 1e-4})   -- this rank's shards
--   for each step:
--       for i, micro in ipairs(micro_batches) do
--           fsdp:set_requires_gradient_sync(i == #micro_batches)
--           (loss(model, micro) / #micro_batches):backward()
--       end
--       fsdp:finish_gradient_synchronization()   -- the root unit's reduce-scatter, waits
--       fsdp:clip_grad_norm_(1.0); opt:step(); opt:zero_grad()
--
-- Units: every element of every nn.ModuleList reached from the model through non-list children
-- is a unit (Flux: each transformer_blocks[i] and single_transformer_blocks[i]; Wan: each
-- blocks[i]); the root unit holds the rest (embedders, norms, projections). Each trainable
-- parameter is sharded on dim 0 over the dp_shard group: rank r owns rows [r*R, r*R + R) with
-- R = ceil(rows / S), zero-padded, so a shard is a (R, ...) tensor even where the parameter has
-- fewer rows. The shards of a unit (one flat buffer per parameter dtype) are what the optimizer
-- updates and what checkpoints save.
--
-- The unsharded parameters are the model's own tensors: their storages are given back
-- (nemo_storage_resize_ to 0 bytes) while the unit is sharded and allocated again and filled
-- by an all-gather before the unit's forward and before its backward, so autograd's saved
-- handles of them stay valid. A unit's forward methods (forward and any forward_*) are wrapped:
--   pre-forward:  all-gather the unit (or wait for its prefetch), start the next unit's
--                 all-gather (enable_fsdp2_prefetch, in the order the first forward recorded);
--                 with grad on, an identity node on each tensor input that requires grad,
--                 whose backward runs after all of the unit's backward: the post-backward
--                 (reduce-scatter the gradients into the shard gradients, free them, reshard);
--   post-forward: an identity node on each output, whose backward runs before the unit's
--                 backward: the pre-backward (all-gather again, prefetch the unit before);
--                 then free the unsharded parameters (reshard_after_forward: all but the last
--                 element of each list and the root, whose backward comes first).
-- With gradient checkpointing the recomputation inside backward is a forward of the unit, which
-- all-gathers it; the post-forward does not reshard during backward.
--
-- Non-obvious rules:
-- - Collectives are issued in the same order on every rank: units are visited in a fixed order
--   and the graph is the same on every rank (as with DDP).
-- - Every synchronized backward reduce-scatters every unit that ran forward, with zeros where a
--   rank has no gradient, so ranks never disagree about which collectives run.
-- - Gradients are reduced in reduce_dtype (float32; float64 for float64 parameters), averaged
--   over dp_shard by the reduce-scatter and over dp_replicate (HSDP) by an all-reduce, then
--   added into the shard gradient (kept in the parameter's dtype, as torch does).
-- - set_requires_gradient_sync(false) keeps the full gradients and reduces their sum on the next
--   synchronized backward (defer_fsdp_grad_sync, the default); with defer_fsdp_grad_sync = false
--   every micro-batch is reduce-scattered and the calls are ignored.
-- - finish_gradient_synchronization() reduces the units whose post-backward did not run (the
--   root: its inputs need no gradient) and waits; a forward with grad on after a synchronized
--   backward that was not finished is an error.
-- - Outside forward / backward the model's parameters hold no memory: read them with
--   full_state_dict() or inside summon_full_params(fn). Frozen parameters (requires_grad false)
--   are not sharded; they stay whole on every rank.
-- - Mixed precision (mp_policy.param_dtype = "bfloat16" on a float32 model): the shards stay
--   float32 (master weights), the model's tensors become bfloat16 copies gathered from the shards
--   cast before the all-gather; floating-point inputs of the root forward are cast too.
-- - One process (dp_shard x dp_replicate = 1) shards nothing, as in Automodel: the manager
--   then only applies activation checkpointing and hands out the model's parameters (with mixed
--   precision it runs with one shard, so the model still computes in param_dtype; so it does
--   with CPU offload).
-- - CPU offload (cpu_offload = true, or offload_policy = {pin_memory = true}): for a model on a
--   CUDA device, each shard (master weights), its gradient and so the optimizer's state live in
--   host memory (page-locked unless pin_memory = false) and AdamW steps there; each all-gather
--   copies the shard to the device first (cast to param_dtype on the host), and each reduced
--   gradient shard comes back to the host before it is added. Device memory then holds only the
--   units being computed and their activations. stats.offload_bytes counts the copies.
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"
local dist = require "nemo.dist"
local class = require "nemo.class"

local C = nffi.C
local check = nffi.check

local M = {}

local FSDP = {}
FSDP.__index = FSDP
M.FSDP2ManagerClass = FSDP

-- FSDP2Config's keys (Automodel) plus the recipe-level ones an fsdp block carries, with the
-- type each takes ("any": accepted for compatibility, validated where it matters).
M.OPTIONS = {
    dp_size = "number", dp_replicate_size = "number", tp_size = "number", cp_size = "number", pp_size = "number",
    ep_size = "number", mp_policy = "table", sequence_parallel = "boolean", tp_plan = "any",
    patch_is_packed_sequence = "boolean", offload_policy = "any", defer_fsdp_grad_sync = "boolean",
    enable_async_tensor_parallel = "boolean", enable_compile = "boolean", enable_fsdp2_prefetch = "boolean",
    fsdp2_backward_prefetch_depth = "number", fsdp2_forward_prefetch_depth = "number",
    activation_checkpointing = "boolean", reshard_after_forward = "boolean", cpu_offload = "boolean",
    reduce_dtype = "string", cp_ring_degree = "number", cp_ulysses_degree = "number", group = "table",
}
local MP_KEYS = {param_dtype = true, reduce_dtype = true, output_dtype = true, cast_forward_inputs = true}

local function sorted_keys(t)
    local k = {}
    for n in pairs(t) do k[#k + 1] = tostring(n) end
    table.sort(k)
    return k
end

local function is_null(v) return v == nil or type(v) == "userdata" end

local function dtype_name(v, what)
    if is_null(v) then return nil end
    if type(v) ~= "string" then error(string.format("FSDP2Manager: %s must be a dtype name, got %s", what, type(v)), 4) end
    local n = v:gsub("^torch%.", "")
    if C.nemo_dtype_from_name(n) < 0 then
        error(string.format("FSDP2Manager: %s: unknown dtype '%s'", what, v), 4)
    end
    return ffi.string(C.nemo_dtype_name(C.nemo_dtype_from_name(n)))
end

-- FSDP2Manager(opts): checks the options; parallelize(model) does the work.
function M.FSDP2Manager(opts)
    opts = opts or {}
    if type(opts) ~= "table" then error("FSDP2Manager: options must be a table", 2) end
    for k, v in pairs(opts) do
        local want = M.OPTIONS[k]
        if want == nil then
            error(string.format("FSDP2Manager: unknown option '%s' (known: %s)", tostring(k),
                table.concat(sorted_keys(M.OPTIONS), ", ")), 2)
        end
        if want ~= "any" and not is_null(v) and type(v) ~= want then
            error(string.format("FSDP2Manager: %s must be a %s, got %s", k, want, type(v)), 2)
        end
    end
    for _, k in ipairs { "pp_size", "ep_size" } do
        local v = opts[k]
        if type(v) == "number" and v > 1 then
            error(string.format("FSDP2Manager: %s = %d: %s parallelism is not supported yet in nemo-lua (set %s " ..
                "to 1; data parallelism with dp_size / dp_replicate_size is, context parallelism with cp_size and " ..
                "tensor parallelism with tp_size)", k, v, ({pp_size = "pipeline", ep_size = "expert"})[k], k), 2)
        end
    end
    -- context parallelism is Ulysses (Automodel: ring x ulysses = cp_size, ring must be 1)
    local cpn = type(opts.cp_size) == "number" and opts.cp_size > 1 and opts.cp_size or 1
    local ring = is_null(opts.cp_ring_degree) and 1 or opts.cp_ring_degree
    if ring ~= 1 then
        error(string.format("FSDP2Manager: cp_ring_degree = %s: ring attention is not supported (Automodel rejects " ..
            "it too); context parallelism is Ulysses: set cp_ring_degree to 1 and cp_ulysses_degree to cp_size",
            tostring(ring)), 2)
    end
    if not is_null(opts.cp_ulysses_degree) and opts.cp_ulysses_degree ~= cpn then
        error(string.format("FSDP2Manager: cp_ring_degree x cp_ulysses_degree = 1 x %s must equal cp_size = %d",
            tostring(opts.cp_ulysses_degree), cpn), 2)
    end
    if opts.sequence_parallel then error("FSDP2Manager: sequence_parallel (tensor-parallel activations split " ..
        "along the sequence) is not supported yet: nemo-lua's tensor parallelism keeps the activations between " ..
        "the sharded layers whole; use cp_size to split the sequence", 2) end
    if opts.enable_async_tensor_parallel then error("FSDP2Manager: enable_async_tensor_parallel needs " ..
        "sequence_parallel, which nemo-lua does not have yet (Automodel refuses it without sequence_parallel too)", 2) end
    if not is_null(opts.tp_plan) then error("FSDP2Manager: tp_plan: custom tensor-parallel plans are not " ..
        "supported yet; tp_size > 1 applies the model's own plan (WanTransformer3DModel:enable_tensor_parallel)", 2) end
    -- CPU offload (Automodel: cpu_offload -> CPUOffloadPolicy(pin_memory=True)): the shards, their
    -- gradients and the optimizer state live in host memory; see _build_unit
    local offload, pin = opts.cpu_offload == true, true
    if not is_null(opts.offload_policy) then
        local op = opts.offload_policy
        if type(op) ~= "table" then
            error("FSDP2Manager: offload_policy must be a table {pin_memory = true|false} (torch's CPUOffloadPolicy), " ..
                "got " .. type(op), 2)
        end
        for k in pairs(op) do
            if k ~= "pin_memory" and k ~= "_target_" then
                error(string.format("FSDP2Manager: offload_policy: unknown key '%s' (pin_memory)", tostring(k)), 2)
            end
        end
        offload, pin = true, op.pin_memory ~= false
    end
    local mp = opts.mp_policy
    local param_dtype, reduce_dtype
    if not is_null(mp) then
        for k in pairs(mp) do
            if not MP_KEYS[k] then
                error(string.format("FSDP2Manager: mp_policy: unknown key '%s' (known: %s)", tostring(k),
                    table.concat(sorted_keys(MP_KEYS), ", ")), 2)
            end
        end
        param_dtype = dtype_name(mp.param_dtype, "mp_policy.param_dtype")
        reduce_dtype = dtype_name(mp.reduce_dtype, "mp_policy.reduce_dtype")
    end
    reduce_dtype = dtype_name(opts.reduce_dtype, "reduce_dtype") or reduce_dtype
    for _, k in ipairs { "fsdp2_backward_prefetch_depth", "fsdp2_forward_prefetch_depth" } do
        local v = opts[k]
        if type(v) == "number" and (v < 0 or v % 1 ~= 0) then
            error(string.format("FSDP2Manager: %s must be a non-negative integer, got %s", k, tostring(v)), 2)
        end
    end
    local self = setmetatable({opts = opts, manager_type = "fsdp2", sharded = true, sync = true,
                               offload = offload, pin = pin,
                               param_dtype = param_dtype, reduce_dtype = reduce_dtype,
                               defer = opts.defer_fsdp_grad_sync ~= false,
                               prefetch = opts.enable_fsdp2_prefetch ~= false,
                               fwd_depth = opts.fsdp2_forward_prefetch_depth or 1,
                               bwd_depth = opts.fsdp2_backward_prefetch_depth or 1,
                               stats = {all_gather_bytes = 0, reduce_scatter_bytes = 0, all_reduce_bytes = 0,
                                        comm_seconds = 0, offload_bytes = 0}}, FSDP)
    return self
end

local now = C.nemo_coll_wtime
local wrapped = setmetatable({}, {__mode = "k"})

-- ==== units ====

local function is_module_list(m)
    local nn = require "nemo.nn"
    return class.isinstance(m, nn.ModuleList)
end

-- Units in registration order: {module, name, last_in_list}; the root comes last.
local function find_units(model)
    local units = {}
    local function walk(m, prefix)
        for name, child in m:named_children() do
            local path = prefix == "" and name or (prefix .. "." .. name)
            if is_module_list(child) then
                local elems = {}
                for ename, e in child:named_children() do elems[#elems + 1] = {ename, e} end
                for i, e in ipairs(elems) do
                    units[#units + 1] = {module = e[2], name = path .. "." .. e[1], last_in_list = i == #elems}
                end
            else
                walk(child, path)
            end
        end
    end
    walk(model, "")
    units[#units + 1] = {module = model, name = "", root = true}
    return units
end

-- A fresh engine-owned contiguous storage under p's own Lua tensor (a parameter loaded from a
-- memory-mapped file cannot have its memory freed and gathered again).
local function own_storage(p, dtype)
    local c = dtype and C.nemo_to(p._c, C.nemo_dtype_from_name(dtype), p._c.devtype, p._c.devindex) or C.nemo_clone(p._c)
    if c == nil then nffi.raise() end
    local old = rawget(p, "_c")
    rawset(p, "_c", ffi.gc(c, C.nemo_tensor_release))
    ffi.gc(old, nil)
    C.nemo_tensor_release(old)
end

local function free_storage(p) check(C.nemo_storage_resize_(p._c.storage, 0)) end

-- rank 0's t on every rank of group (t may be a strided view)
local function broadcast_whole(group, t)
    if t:is_contiguous() then check(C.nemo_coll_broadcast(group._c, t._c, 0)); return end
    local tmp = t:contiguous()
    check(C.nemo_coll_broadcast(group._c, tmp._c, 0))
    check(C.nemo_copy_(t._c, tmp._c))
    tmp:free()
end

-- ==== setup ====

function FSDP:_build_unit(u, S, rank)
    local groups, by_dtype = {}, {}
    for _, e in ipairs(u.entries) do
        local p = e.p
        local g = by_dtype[p.dtype]
        if not g then
            local rdt = self.reduce_dtype or (p.dtype == "float64" and "float64" or "float32")
            -- device: where the unit computes; sdev: where its shard, gradient and optimizer state live
            g = {dtype = p.dtype, gdt = self.param_dtype or p.dtype, rdt = rdt, device = p.device,
                 sdev = self.offload and "cpu" or p.device, entries = {}, N = 0}
            by_dtype[p.dtype] = g
            groups[#groups + 1] = g
        end
        local shape = p.shape
        local d0 = #shape > 0 and shape[1] or 1
        local numel = p:numel()
        e.d0, e.rowsize = d0, d0 > 0 and numel / d0 or 0
        e.R = math.ceil(d0 / S)
        e.off = g.N
        e.real = math.max(0, math.min(e.R, d0 - rank * e.R))
        e.nbytes = tonumber(p._c.storage.nbytes)
        g.N = g.N + e.R * e.rowsize
        g.entries[#g.entries + 1] = e
    end
    for _, g in ipairs(groups) do
        g.shard = Tensor.zeros({g.N}, {dtype = g.dtype, device = g.sdev})
        if g.sdev ~= g.device and self.pin and g.device:match("^cuda") then   -- page-locked: DMA transfers
            local pinned = g.shard:pin_memory()
            g.shard:free()
            g.shard = pinned
        end
        for _, e in ipairs(g.entries) do
            local p = e.p
            local sshape = {e.R}
            for i = 2, #p.shape do sshape[i] = p.shape[i] end
            local piece = g.shard:narrow(0, e.off, e.R * e.rowsize)
            e.sp = piece:view(sshape)
            piece:free()
            e.sp.requires_grad = true
            rawset(e.sp, "_fsdp_name", e.name)
            if e.real > 0 then   -- this rank's rows of the full parameter
                local rows = p:narrow(0, rank * e.R, e.real)
                local dst = e.sp:narrow(0, 0, e.real)
                check(C.nemo_copy_(dst._c, rows._c))
                rows:free(); dst:free()
            end
        end
    end
    u.groups = groups
end

-- parallelize(model) -> model, hooked in place.
function FSDP:parallelize(model)
    if self.module then error("FSDP2Manager:parallelize: this manager already runs a model", 2) end
    if wrapped[model] then error("FSDP2Manager:parallelize: the model already has a parallel manager", 2) end
    if not dist.is_initialized() then
        error("FSDP2Manager:parallelize: needs an initialized process group (call nemo.dist.init_process_group() " ..
              "first)", 2)
    end
    local mesh = require "nemo.parallel.mesh"
    local mopts = {manager = "fsdp2"}
    for _, k in ipairs(mesh.KEYS) do mopts[k] = self.opts[k] end
    local ok, dm = pcall(mesh.DeviceMesh, mopts)
    if not ok then error(dm, 2) end
    -- with context parallelism the cp ranks shard too (Automodel's dp_shard_cp): their gradients
    -- are each a part of the sum, so the reduce-scatter's average is multiplied back by cp
    local CP = dm:size("cp")
    local S, R = dm:size(CP > 1 and "dp_shard_cp" or "dp_shard"), dm:size("dp_replicate")
    if R > 1 and S == 1 then
        error(string.format("FSDP2Manager: dp_replicate_size = %d with dp_shard = 1 is plain replication; use the " ..
            "ddp manager for that (FSDP2 needs dp_size / dp_replicate_size >= 2)", R), 2)
    end
    self.mesh, self.S, self.R, self.CP = dm, S, R, CP
    if CP > 1 then
        if type(model.enable_context_parallel) ~= "function" then
            error(string.format("FSDP2Manager: cp_size = %d but the model (%s) has no enable_context_parallel " ..
                "(context parallelism runs FluxTransformer2DModel and WanTransformer3DModel)", CP,
                tostring(getmetatable(model) and getmetatable(model).__name or type(model))), 2)
        end
        model:enable_context_parallel(dm:get_group("cp"))
    end
    -- tensor parallelism: every rank of a tp group keeps its slice of rank 0's weights
    local TP = dm:size("tp")
    self.TP = TP
    if TP > 1 then
        if type(model.enable_tensor_parallel) ~= "function" then
            error(string.format("FSDP2Manager: tp_size = %d but the model (%s) has no tensor-parallel plan " ..
                "(enable_tensor_parallel: WanTransformer3DModel and FluxTransformer2DModel have one)",
                TP, tostring(getmetatable(model) and getmetatable(model).__name or type(model))), 2)
        end
        local world = dist.group_world()
        for _, p in model:named_parameters() do
            own_storage(p)
            check(C.nemo_coll_broadcast(world._c, p._c, 0))
        end
        for _, b in model:named_buffers() do broadcast_whole(world, b) end
        self.tp_group = dm:get_group("tp")
        model:enable_tensor_parallel(self.tp_group, {cp_size = CP})
        self.broadcast_done = true
    end
    local param_dtype = self.param_dtype
    if self.opts.activation_checkpointing and model.enable_gradient_checkpointing then
        model:enable_gradient_checkpointing()
    end
    self.module = model
    wrapped[model] = self
    local names, params = {}, {}
    self.frozen = {}
    for name, p in model:named_parameters() do
        if not rawget(p, "requires_grad") then self.frozen[#self.frozen + 1] = {name, p} end
        if rawget(p, "requires_grad") then
            names[#names + 1] = name
            params[#params + 1] = p
            if param_dtype and p.dtype ~= param_dtype and p.dtype ~= "float32" and p.dtype ~= "float64" then
                error(string.format("FSDP2Manager: mp_policy.param_dtype = %s but parameter %s is %s: mixed " ..
                    "precision keeps float32 (or float64) master weights; load the model in float32 (torch_dtype) " ..
                    "to compute in %s", param_dtype, name, p.dtype, param_dtype), 2)
            end
            if param_dtype and p.dtype ~= param_dtype then self.mixed = true end
        end
    end
    self.names = names
    for i, p in ipairs(params) do
        if #p.shape == 0 then
            error(string.format("FSDP2Manager: parameter %s is a 0-dimensional tensor; FSDP2 shards on dim 0 " ..
                "(make it shape (1))", names[i]), 2)
        end
    end
    -- CPU offload means something only for a model on a device (a CPU model's shards are in host memory anyway)
    if self.offload and (#params == 0 or params[1].device == "cpu") then self.offload = false end
    if S * R == 1 and not self.mixed and not self.offload then   -- nothing to shard (Automodel skips FSDP on one rank)
        self.plain = params
        return model
    end
    -- (one rank with mixed precision or CPU offload runs the same machinery with one shard:
    -- float32 master weights in host or device memory, a param_dtype copy gathered onto the
    -- device for each forward and backward)
    self.shard_group = dm:get_group(CP > 1 and "dp_shard_cp" or "dp_shard")
    self.rep_group = R > 1 and dm:get_group("dp_replicate") or nil
    local rank = self.shard_group:rank()
    -- every rank starts from rank 0's weights and buffers (whatever each rank's initialization was)
    local world = dist.group_world()
    for _, p in ipairs(params) do
        own_storage(p)
        if not self.broadcast_done then check(C.nemo_coll_broadcast(world._c, p._c, 0)) end
    end
    if not self.broadcast_done then
        for _, p in model:named_parameters() do if not rawget(p, "requires_grad") then broadcast_whole(world, p) end end
        for _, b in model:named_buffers() do broadcast_whole(world, b) end
    end
    -- units and their entries; a parameter belongs to the first unit (registration order) that holds it
    local units = find_units(model)
    local owner = {}
    for ui, u in ipairs(units) do
        u.index = ui
        u.entries = {}
        u.reshard_after_forward = not u.root and not u.last_in_list
        if self.opts.reshard_after_forward == false then u.reshard_after_forward = false end
        local prefix = u.root and "" or (u.name .. ".")
        for name, p in u.module:named_parameters() do
            if rawget(p, "requires_grad") and not owner[p] then
                owner[p] = u
                u.entries[#u.entries + 1] = {p = p, name = prefix .. name, tp = rawget(p, "_tp")}
            end
        end
    end
    self.units = {}
    for _, u in ipairs(units) do
        if #u.entries > 0 or u.root then self.units[#self.units + 1] = u end
    end
    for _, u in ipairs(self.units) do
        self:_build_unit(u, S, rank)
        if self.mixed then   -- the model's tensors become the param_dtype copies
            for _, e in ipairs(u.entries) do
                if e.p.dtype ~= param_dtype then
                    own_storage(e.p, param_dtype)
                    e.nbytes = tonumber(e.p._c.storage.nbytes)
                end
            end
        end
        u.state = "unsharded"
        self:_reshard(u)
        u.depth, u.forwarded, u.post_done = 0, false, false
        self:_wrap_unit(u)
    end
    self.root = self.units[#self.units]
    -- the shard parameters in the model's registration order
    local by_param = {}
    for _, u in ipairs(self.units) do for _, e in ipairs(u.entries) do by_param[e.p] = e end end
    self.entries = {}
    for i, p in ipairs(params) do
        local e = by_param[p]
        e.name = names[i]
        self.entries[i] = e
    end
    self.order, self.order_frozen = {}, false
    local mp = self.opts.mp_policy
    self.cast_inputs = self.mixed and not (type(mp) == "table" and mp.cast_forward_inputs == false)
    return model
end

-- ==== unshard / reshard ====

function FSDP:_start_gather(u)
    if u.state == "unsharded" or u.gather then return end
    local t0 = now()
    u.gather = {}
    for gi, g in ipairs(u.groups) do
        local out = Tensor.empty({g.N * self.S}, {dtype = g.gdt, device = g.device})
        -- mixed precision: the shard is cast to param_dtype first, so the all-gather moves half the bytes;
        -- CPU offload: cast on the host, then copied to the device
        local input
        if g.sdev ~= g.device then
            input = g.shard:to{dtype = g.gdt, device = g.device}
            self.stats.offload_bytes = self.stats.offload_bytes + g.N * input:element_size()
        elseif g.gdt ~= g.dtype then
            input = g.shard:to{dtype = g.gdt}
        end
        local w = C.nemo_coll_all_gather_async(self.shard_group._c, out._c, (input or g.shard)._c)
        if w == nil then out:free(); nffi.raise() end
        u.gather[gi] = {out = out, work = w, input = input}
        self.stats.all_gather_bytes = self.stats.all_gather_bytes + g.N * self.S * out:element_size()
    end
    self.stats.comm_seconds = self.stats.comm_seconds + (now() - t0)
end

local function wait_free(w, what)
    local rc = C.nemo_coll_wait(w)
    if rc < 0 then
        local msg = ffi.string(C.nemo_last_error())
        C.nemo_coll_work_free(w)
        error("FSDP2 " .. what .. ": " .. msg, 0)
    end
    C.nemo_coll_work_free(w)
end

-- fn(q, real) for each rank q that holds rows of e's parameter (real of them, from row q * R)
local function rank_rows(e, S, fn)
    for q = 0, S - 1 do
        local real = math.max(0, math.min(e.R, e.d0 - q * e.R))
        if real > 0 then fn(q, real) end
    end
end

-- full (e's whole shape) <- e's rows from an all-gathered flat buffer (S blocks of g.N)
local function copy_from_gathered(e, g, S, out, full)
    rank_rows(e, S, function(q, real)
        local src = out:narrow(0, q * g.N + e.off, real * e.rowsize)
        local dst = full:narrow(0, q * e.R, real)
        local srcv = src:view(dst.shape)
        check(C.nemo_copy_(dst._c, srcv._c))
        src:free(); dst:free(); srcv:free()
    end)
end

-- wait for and drop all-gathers started for units that did not run (a graph that changed)
function FSDP:_discard_prefetches()
    for _, v in ipairs(self.units) do
        if v.gather then
            for _, ga in ipairs(v.gather) do
                if ga.work then wait_free(ga.work, "all-gather") end
                ga.out:free()
                if ga.input then ga.input:free() end
            end
            v.gather = nil
        end
    end
end

function FSDP:_unshard(u)
    if u.state == "unsharded" then return end
    self:_start_gather(u)
    local t0 = now()
    local S = self.S
    for gi, g in ipairs(u.groups) do
        local ga = u.gather[gi]
        wait_free(ga.work, "all-gather")
        ga.work = nil
        if ga.input then ga.input:free() end
        for _, e in ipairs(g.entries) do
            local p = e.p
            check(C.nemo_storage_resize_(p._c.storage, e.nbytes))
            copy_from_gathered(e, g, S, ga.out, p)
        end
        ga.out:free()
    end
    u.gather = nil
    u.state = "unsharded"
    self.stats.comm_seconds = self.stats.comm_seconds + (now() - t0)
end

function FSDP:_reshard(u)
    if u.state == "sharded" then return end
    for _, g in ipairs(u.groups) do
        for _, e in ipairs(g.entries) do free_storage(e.p) end
    end
    u.state = "sharded"
end

-- start the all-gathers of the units after (dir 1) or before (dir -1) u in forward order
function FSDP:_prefetch(u, dir)
    if not self.prefetch or not self.order_frozen then return end
    local pos = self.pos_of[u]
    if not pos then return end
    local depth = dir > 0 and self.fwd_depth or self.bwd_depth
    for k = 1, depth do
        local v = self.order[pos + dir * k]
        if not v then break end
        if v.state == "sharded" then self:_start_gather(v) end
    end
end

-- ==== gradients ====

-- wait for the reduce-scatter in flight and add its result into the shard gradients
function FSDP:_drain()
    local pend = self.pending_rs
    if not pend then return end
    self.pending_rs = nil
    local t0 = now()
    for _, it in ipairs(pend.items) do
        if it.work then wait_free(it.work, "reduce-scatter") end
        if it.rep_work then wait_free(it.rep_work, "all-reduce (dp_replicate)") end
    end
    for _, it in ipairs(pend.items) do
        local g = it.group
        local fresh = false
        if not g.gbuf then g.gbuf = Tensor.empty({g.N}, {dtype = g.dtype, device = g.sdev}) end
        local red = it.out
        if self.CP > 1 then   -- the average over dp_shard x cp, times cp: summed over cp, averaged over dp
            autograd.no_grad(red.mul_, red, self.CP)
        end
        if g.sdev ~= g.device then   -- CPU offload: the reduced shard gradient goes to the host
            red = it.out:to{device = g.sdev}
            self.stats.offload_bytes = self.stats.offload_bytes + g.N * red:element_size()
        end
        -- a shard gradient is fresh when the optimizer dropped it (zero_grad sets it to nil)
        for _, e in ipairs(g.entries) do if rawget(e.sp, "grad") == nil then fresh = true end end
        if fresh then
            check(C.nemo_copy_(g.gbuf._c, red._c))
            for _, e in ipairs(g.entries) do
                local piece = g.gbuf:narrow(0, e.off, e.R * e.rowsize)
                e.sp.grad = piece:view(e.sp.shape)
                piece:free()
            end
        else
            check(C.nemo_binary_(g.gbuf._c, red._c, C.NEMO_BOP_ADD, 1))
        end
        if not rawequal(red, it.out) then red:free() end
        it.out:free()
        it.input:free()
    end
    self.stats.comm_seconds = self.stats.comm_seconds + (now() - t0)
end

function FSDP:_reduce(u)
    self:_drain()   -- at most one unit's reduction in flight: memory stays bounded
    local t0 = now()
    local S = self.S
    local items = {}
    for _, g in ipairs(u.groups) do
        local input = Tensor.zeros({g.N * S}, {dtype = g.rdt, device = g.device})
        for _, e in ipairs(g.entries) do
            local gr = rawget(e.p, "grad")
            if gr ~= nil then   -- each rank's rows into its block of the reduce-scatter input
                rank_rows(e, S, function(q, real)
                    local src = gr:narrow(0, q * e.R, real)
                    local dstf = input:narrow(0, q * g.N + e.off, real * e.rowsize)
                    local dst = dstf:view(src.shape)
                    check(C.nemo_copy_(dst._c, src._c))
                    src:free(); dstf:free(); dst:free()
                end)
                e.p.grad = nil
                rawset(e.p, "_grad_owned", nil)
                gr:free()
            end
        end
        local out = Tensor.empty({g.N}, {dtype = g.rdt, device = g.device})
        local w = C.nemo_coll_reduce_scatter_async(self.shard_group._c, out._c, input._c, C.NEMO_COLL_AVG)
        if w == nil then nffi.raise() end
        local it = {group = g, input = input, out = out, work = w}
        local esz = input:element_size()
        self.stats.reduce_scatter_bytes = self.stats.reduce_scatter_bytes + g.N * S * esz
        if self.rep_group then
            -- HSDP: the shard's average over the replicas (after the reduce-scatter is done)
            wait_free(w, "reduce-scatter")
            it.work = nil
            local rw = C.nemo_coll_all_reduce_async(self.rep_group._c, out._c, C.NEMO_COLL_AVG)
            if rw == nil then nffi.raise() end
            it.rep_work = rw
            self.stats.all_reduce_bytes = self.stats.all_reduce_bytes + g.N * esz
        end
        items[#items + 1] = it
    end
    self.pending_rs = {items = items}
    self.stats.comm_seconds = self.stats.comm_seconds + (now() - t0)
end

function FSDP:_post_backward(u)
    if u.post_done then return end
    u.post_done = true
    if self.sync then
        self:_reduce(u)
        self.need_finish = true
    end
    self:_reshard(u)
end

-- ==== the hooks around a unit's forward ====

local function post_bw(node, g)
    node.mgr:_post_backward(node.unit)
    return g
end

local function pre_bw(node, g)
    local mgr, u = node.mgr, node.unit
    if not node.done then
        node.done = true
        if u.state == "sharded" then mgr:_unshard(u) end
        mgr:_prefetch(u, -1)
    end
    return g
end

-- an alias of t whose backward node runs hook; nil when no node is recorded
local function identity(t, name, fn, mgr, u)
    local a = Tensor.wrap(C.nemo_tensor_alias(t._c))
    local node = autograd.node(name, fn, a, t)
    if node == nil then a:free(); return nil end
    node.mgr, node.unit = mgr, u
    return a
end

function FSDP:_pre_forward(u)
    local bw = autograd.in_backward()
    if u.root and not bw then
        if self.need_finish and self.defer and autograd.is_grad_enabled() then
            error("FSDP2: the gradients of the previous backward were not synchronized; call " ..
                  "finish_gradient_synchronization() on the FSDP2 manager after the last backward of a step " ..
                  "(before clipping and optimizer:step())", 3)
        end
        -- a new forward: nothing left unsharded or prefetched from before (the optimizer may have
        -- stepped since)
        self:_drain()
        self:_discard_prefetches()
        for _, v in ipairs(self.units) do
            if v.state == "unsharded" then self:_reshard(v) end
        end
        if not self.order_frozen then self.order, self.pos_of = {}, {} end
    end
    self:_unshard(u)
    u.post_done = false
    if not bw then
        u.forwarded = true
        if not self.order_frozen and not self.pos_of[u] then
            self.order[#self.order + 1] = u
            self.pos_of[u] = #self.order
        end
        self:_prefetch(u, 1)
    else
        self:_prefetch(u, -1)
    end
end

function FSDP:_post_forward(u)
    local bw = autograd.in_backward()
    if u.root and not bw then
        self.order_frozen = true
        if not autograd.is_grad_enabled() then   -- no backward will follow
            for _, v in ipairs(self.units) do self:_reshard(v) end
            for _, v in ipairs(self.units) do v.forwarded = false end
        end
    elseif u.reshard_after_forward and not bw then
        self:_reshard(u)
    end
end

local function pack(...) return {n = select("#", ...), ...} end

local FLOAT = {float32 = true, float64 = true, bfloat16 = true, float16 = true}

-- mixed precision: floating-point tensor arguments of the root's forward (and those inside a
-- table of named arguments) cast to param_dtype (mp_policy.cast_forward_inputs, default true)
function FSDP:_cast_inputs(args)
    local dt = self.param_dtype
    local function cast(x)
        if Tensor.is_tensor(x) and FLOAT[x.dtype] and x.dtype ~= dt then return x:to{dtype = dt} end
        return x
    end
    for i = 1, args.n do
        local a = args[i]
        if Tensor.is_tensor(a) then args[i] = cast(a)
        elseif type(a) == "table" and getmetatable(a) == nil then
            local c = {}
            for k, v in pairs(a) do c[k] = cast(v) end
            args[i] = c
        end
    end
end

function FSDP:_wrap_unit(u)
    local mgr = self
    local m = u.module
    local methods = {"forward"}
    local seen = {forward = true}
    -- forward_* methods of the module's class (Flux's single blocks run forward_joint)
    local cls = getmetatable(m)
    local visited = {}
    while type(cls) == "table" and not visited[cls] do
        visited[cls] = true
        local idx = rawget(cls, "__index")
        local src = type(idx) == "table" and idx or cls
        for k, v in pairs(src) do
            if type(k) == "string" and type(v) == "function" and k:match("^forward_") and not seen[k] then
                seen[k] = true
                methods[#methods + 1] = k
            end
        end
        local parent = getmetatable(src)
        cls = parent and rawget(parent, "__index") or nil
    end
    for _, k in ipairs(methods) do
        local fn = m[k]
        if type(fn) == "function" then
            rawset(m, k, function(mod, ...)
                u.depth = u.depth + 1
                if u.depth > 1 then   -- a forward method called from another one of the same unit
                    local r = pack(pcall(fn, mod, ...))
                    u.depth = u.depth - 1
                    if not r[1] then error(r[2], 0) end
                    return unpack(r, 2, r.n)
                end
                local r = pack(pcall(function(...)
                    mgr:_pre_forward(u)
                    local args = pack(...)
                    if u.root and mgr.cast_inputs then mgr:_cast_inputs(args) end
                    if autograd.is_grad_enabled() then
                        for i = 1, args.n do
                            local a = args[i]
                            if Tensor.is_tensor(a) and a.requires_grad then
                                args[i] = identity(a, "fsdp_post_backward", post_bw, mgr, u) or a
                            end
                        end
                    end
                    local outs = pack(fn(mod, unpack(args, 1, args.n)))
                    if autograd.is_grad_enabled() then
                        local hook = {}   -- one pre-backward per forward call, shared by its outputs
                        local function wrap_out(o)
                            if Tensor.is_tensor(o) and o.requires_grad then
                                local a = identity(o, "fsdp_pre_backward", function(node, g)
                                    if hook.done then return g end
                                    hook.done = true
                                    return pre_bw(node, g)
                                end, mgr, u)
                                return a or o
                            end
                            return o
                        end
                        for i = 1, outs.n do
                            local o = outs[i]
                            if Tensor.is_tensor(o) then outs[i] = wrap_out(o)
                            elseif type(o) == "table" and getmetatable(o) == nil then
                                for j, x in ipairs(o) do o[j] = wrap_out(x) end
                            end
                        end
                    end
                    mgr:_post_forward(u)
                    return unpack(outs, 1, outs.n)
                end, ...))
                u.depth = u.depth - 1
                if not r[1] then error(r[2], 0) end
                return unpack(r, 2, r.n)
            end)
        end
    end
end

-- ==== the manager interface the training loop uses ====

function FSDP:set_requires_gradient_sync(on)
    if not self.defer then return end   -- defer_fsdp_grad_sync = false: every micro-batch reduces
    self.sync = not not on
end

-- no_sync(fn, ...): run fn with gradient reduction deferred (gradient accumulation steps).
function FSDP:no_sync(fn, ...)
    local old = self.sync
    self.sync = false
    local res = pack(pcall(fn, ...))
    self.sync = old
    if not res[1] then error(res[2], 0) end
    return unpack(res, 2, res.n)
end

-- After the last backward of a step: reduce what the backward did not (the root unit), wait for
-- every reduction and reshard. Without gradient sync it only reshards (gradients stay whole).
function FSDP:finish_gradient_synchronization()
    if not self.units then return end
    local t0 = now()
    for i = #self.units, 1, -1 do
        local u = self.units[i]
        if u.forwarded and not u.post_done then
            u.post_done = true
            if self.sync then self:_reduce(u); self.need_finish = true end
            self:_reshard(u)
        end
    end
    self:_drain()
    self:_discard_prefetches()
    for _, u in ipairs(self.units) do
        if self.sync then u.forwarded = false end
    end
    if self.sync then self.need_finish = false end
    self.last = {finish_seconds = now() - t0}
end
FSDP.wait = FSDP.finish_gradient_synchronization

-- What the optimizer updates: this rank's shards ((R, ...) tensors, zero rows past the end of a
-- parameter), in the model's registration order.
function FSDP:parameters()
    if self.plain then return self.plain end
    local out = {}
    for i, e in ipairs(self.entries or {}) do out[i] = e.sp end
    return out
end

-- {{name, tensor}...} of the same.
function FSDP:named_parameters()
    local out = {}
    if self.plain then
        for i, p in ipairs(self.plain) do out[i] = {self.names[i], p} end
        return out
    end
    for i, e in ipairs(self.entries) do out[i] = {e.name, e.sp} end
    return out
end

-- The global 2-norm of the gradients over every shard of every rank; scales the shards' gradients
-- by min(1, max_norm / (norm + 1e-6)) as torch's clip_grad_norm_ does. Returns the norm.
-- With tensor parallelism the sharded parameters' squares are summed over the tp group too (the
-- replicated ones are the same on every tp rank: counted once).
function FSDP:clip_grad_norm_(max_norm, opts)
    local optim = require "nemo.optim"
    if self.plain and not self.tp_group then return optim.clip_grad_norm_(self.plain, max_norm, opts) end
    if type(max_norm) ~= "number" or max_norm <= 0 then
        error("clip_grad_norm_: max_norm must be a positive number, got " .. tostring(max_norm), 2)
    end
    local norm_type = opts and opts.norm_type or 2
    if norm_type ~= 2 then error("clip_grad_norm_: only norm_type 2 is supported, got " .. tostring(norm_type), 2) end
    local entries = self:_entries_or_plain()
    local gs, is_tp = {}, {}
    for _, e in ipairs(entries) do
        local g = rawget(e.sp, "grad")
        if g ~= nil then gs[#gs + 1] = g; is_tp[#gs] = e.tp ~= nil end
    end
    local rep, tps = 0, 0
    for i, v in ipairs(optim.sum_squares(gs)) do   -- one wait, not one per shard
        if is_tp[i] then tps = tps + v else rep = rep + v end
    end
    if not self.plain then
        local v = dist.all_reduce_numbers({rep, tps}, "sum", self.shard_group)
        rep, tps = v[1], v[2]
    end
    if self.tp_group then tps = dist.all_reduce_number(tps, "sum", self.tp_group) end
    local total = math.sqrt(rep + tps)
    if opts and opts.error_if_nonfinite and total ~= total then
        error("clip_grad_norm_: the total norm of the gradients is non-finite", 2)
    end
    local coef = max_norm / (total + 1e-6)
    if self.plain then
        optim.scale_grads_(self.plain, coef)
        return total
    end
    if coef < 1 then
        for _, u in ipairs(self.units) do
            for _, g in ipairs(u.groups) do
                if g.gbuf and rawget(g.entries[1].sp, "grad") ~= nil then
                    local s = Tensor.full({}, coef, {dtype = g.dtype == "float64" and "float64" or "float32",
                                                     device = g.sdev})
                    check(C.nemo_binary_(g.gbuf._c, s._c, C.NEMO_BOP_MUL, 1))
                end
            end
        end
    end
    return total
end

-- summon_full_params(fn, ...): every unit all-gathered while fn runs (on every rank: it is
-- collective), resharded after. For reading or exporting the whole model.
-- With tensor parallelism the tensor-parallel parameters are whole too while fn runs (gathered
-- over the tp group): fn reads or exports the model (not for a forward: the layers expect slices).
function FSDP:summon_full_params(fn, ...)
    local swapped = {}
    local function tp_whole()   -- each tp parameter's storage swapped for the whole tensor's
        if not self.tp_group then return end
        local tpm = require "nemo.parallel.tensor"
        for _, p in self.module:named_parameters() do
            local info = rawget(p, "_tp")
            if info then
                local whole = tpm.full(p, info, self.tp_group)
                swapped[#swapped + 1] = {p = p, c = rawget(p, "_c"), whole = whole}
                rawset(p, "_c", whole._c)
            end
        end
    end
    local function tp_restore()
        for _, e in ipairs(swapped) do rawset(e.p, "_c", e.c); e.whole:free() end
        swapped = {}
    end
    if self.plain then
        tp_whole()
        local res = pack(pcall(fn, ...))
        tp_restore()
        if not res[1] then error(res[2], 0) end
        return unpack(res, 2, res.n)
    end
    self:_drain()
    local was = {}
    for i, u in ipairs(self.units) do
        was[i] = u.state
        self:_unshard(u)
    end
    local ok, err = pcall(tp_whole)
    local res = ok and pack(pcall(fn, ...)) or {false, err, n = 2}
    tp_restore()
    for i, u in ipairs(self.units) do
        if was[i] == "sharded" then self:_reshard(u) end
    end
    if not res[1] then error(res[2], 0) end
    return unpack(res, 2, res.n)
end

-- full_state_dict() -> {name = tensor}, keys (registration order): the whole trainable
-- parameters, gathered (collective: every rank calls it; every rank gets them).
function FSDP:full_state_dict()
    local sd, keys = {}, {}
    local tpm = require "nemo.parallel.tensor"
    if self.plain then
        for i, name in ipairs(self.names) do
            local p, info = self.plain[i], rawget(self.plain[i], "_tp")
            sd[name] = info and tpm.full(p, info, self.tp_group) or p:detach():clone()
            keys[i] = name
        end
        return sd, keys
    end
    -- gathered from the shards (the master weights, also under mixed precision), unit by unit
    self:_drain()
    local S = self.S
    for _, u in ipairs(self.units) do
        for _, g in ipairs(u.groups) do
            local out = Tensor.empty({g.N * S}, {dtype = g.dtype, device = g.device})
            local src = g.sdev ~= g.device and g.shard:to{device = g.device} or g.shard
            check(C.nemo_coll_all_gather(self.shard_group._c, out._c, src._c))
            if not rawequal(src, g.shard) then src:free() end
            for _, e in ipairs(g.entries) do
                local full = Tensor.empty(e.p.shape, {dtype = g.dtype, device = g.device})
                copy_from_gathered(e, g, S, out, full)
                if e.tp then   -- this tp rank's slice: the whole parameter from every tp rank's
                    local whole = tpm.full(full, e.tp, self.tp_group)
                    full:free()
                    full = whole
                end
                sd[e.name] = full
            end
            out:free()
        end
    end
    for i, name in ipairs(self.names) do keys[i] = name end
    return sd, keys
end

-- ==== sharded checkpoints ====
-- save_sharded(dir, optimizer): this rank's shards into dir/model/shard-WWWWW-of-NNNNN.safetensors
-- (each parameter's real rows, named as in the model) and, with an optimizer, its AdamW state
-- into dir/optim/shard-WWWWW-of-NNNNN.safetensors (exp_avg.<name>, exp_avg_sq.<name>; steps in
-- the metadata). Each file's `layout` says, for every parameter it holds a piece of, the whole
-- parameter's shape and the piece's place in it: rows [row0, row0 + rows) and, for a piece of
-- a tensor-parallel row-wise weight, columns [col0, col0 + cols) (`whole`: all of it). Writers:
-- the dp_shard ranks of each tp rank (W = dp_shard x tp files, writer w = tp_rank x dp_shard +
-- shard rank); replicated parameters come from tp rank 0 only, and under HSDP only the first
-- replica writes (the others hold the same shards). Every rank calls it; the folders must
-- exist. load_sharded(dir, optimizer) reads the pieces that overlap this rank's part of each
-- parameter, whatever dp / tp layout wrote them (resharding on load), into its shards and
-- optimizer state; M.load_full(dir) assembles whole tensors (one process, a consolidated export).
local SHARD_FORMAT = "nemo-lua.fsdp2-shard"

local function shard_name(q, S) return string.format("shard-%05d-of-%05d.safetensors", q, S) end
M.shard_name = shard_name

function FSDP:_entries_or_plain()
    if self.plain then
        local out = {}
        for i, p in ipairs(self.plain) do
            local d0 = #p.shape > 0 and p.shape[1] or 1
            out[i] = {name = self.names[i], p = p, sp = p, d0 = d0, R = d0, real = d0, tp = rawget(p, "_tp")}
        end
        return out, 1, 0
    end
    return self.entries, self.S, self.shard_group:rank()
end

-- save_sharded(dir, optimizer, {frozen = true}): frozen = false leaves the frozen parameters out
-- (a LoRA run: they are the pretrained weights, loaded again from the model folder).
function FSDP:save_sharded(dir, optimizer, opts)
    local st = require "nemo.safetensors"
    local json = require "nemo.json"
    local tpm = require "nemo.parallel.tensor"
    local entries, S, q = self:_entries_or_plain()
    if self.R and self.R > 1 and self.mesh:get_local_rank("dp_replicate") ~= 0 then return end
    local T, t = self.TP or 1, self.tp_group and self.tp_group:rank() or 0
    local W, w = S * T, t * S + q   -- this writer among all
    local tensors, layout = {}, {}
    local otensors, steps = {}, {}
    local ostate = {}
    if optimizer then
        local sd = optimizer:state_dict()
        local idx_of = {}
        local k = 0
        for _, g in ipairs(optimizer.param_groups) do
            for _, p in ipairs(g.params) do k = k + 1; idx_of[p] = k end
        end
        for _, e in ipairs(entries) do
            local i = idx_of[e.sp]
            if i == nil then
                error("FSDP2 save_sharded: the optimizer does not hold the shard of " .. e.name ..
                      " (build it from the manager's parameters())", 2)
            end
            ostate[e] = sd.state[i]
        end
    end
    local function place(info, p, r0, n)   -- a piece's layout entry, in whole-parameter coordinates
        local shape = {}
        for i, v in ipairs(info and info.shape or p.shape) do shape[i] = v end
        local ps = tpm.pieces(info, r0, n)
        if #ps == 1 then
            return {shape = json.array(shape), row0 = ps[1][1], rows = ps[1][2], col0 = ps[1][3], cols = ps[1][4]}
        end
        local list = {}   -- a segmented row-parallel weight: one piece per segment
        for i, pc in ipairs(ps) do list[i] = {row0 = pc[1], rows = pc[2], col0 = pc[3], cols = pc[4], lcol0 = pc[5]} end
        return {shape = json.array(shape), pieces = list}
    end
    for _, e in ipairs(entries) do
        if e.tp or t == 0 then   -- a replicated parameter is the same on every tp rank: tp rank 0 writes it
            layout[e.name] = place(e.tp, e.p, q * e.R, e.real)
            if e.real > 0 then
                tensors[e.name] = e.sp:narrow(0, 0, e.real)
                local os_ = ostate[e]
                if os_ then
                    otensors["exp_avg." .. e.name] = os_.exp_avg:narrow(0, 0, e.real)
                    otensors["exp_avg_sq." .. e.name] = os_.exp_avg_sq:narrow(0, 0, e.real)
                end
            end
            if ostate[e] then steps[e.name] = ostate[e].step end
        end
    end
    -- frozen parameters are not sharded: the first shard file of each tp rank holds them (whole,
    -- or this tp rank's slice)
    for _, f in ipairs((opts and opts.frozen == false) and {} or self.frozen or {}) do
        local info = rawget(f[2], "_tp")
        if q == 0 and (info or t == 0) then
            local d0 = #f[2].shape > 0 and f[2].shape[1] or 1
            local l = place(info, f[2], 0, d0)
            if info then l.frozen = true else l = {shape = l.shape, whole = true} end
            layout[f[1]] = l
            tensors[f[1]] = f[2]
        end
    end
    local meta = {format = SHARD_FORMAT, shard = tostring(w), num_shards = tostring(W),
                  layout = json.encode(layout)}
    st.save_file(tensors, dir .. "/model/" .. shard_name(w, W), meta)
    if optimizer then
        st.save_file(otensors, dir .. "/optim/" .. shard_name(w, W),
            {format = SHARD_FORMAT, shard = tostring(w), num_shards = tostring(W), steps = json.encode(steps)})
    end
end

-- the shard files of a folder: {files = {f...} (index q+1), S}, each f = {h = safe_open, layout, meta}
local function open_shards(folder, what)
    local st = require "nemo.safetensors"
    local json = require "nemo.json"
    local fs = require "nemo.fs"
    if not fs.isdir(folder) then error(string.format("%s: no folder %s", what, folder), 0) end
    local files, S = {}, nil
    for _, n in ipairs(fs.list(folder)) do
        local q, s = n:match("^shard%-(%d+)%-of%-(%d+)%.safetensors$")
        if q then
            q, s = tonumber(q), tonumber(s)
            if S and s ~= S then
                error(string.format("%s: %s mixes shards of %d and %d ranks", what, folder, S, s), 0)
            end
            S = s
            local h = st.safe_open(folder .. "/" .. n)
            local meta = h:metadata() or {}
            if meta.format ~= SHARD_FORMAT then
                error(string.format("%s: %s/%s is not an FSDP2 shard file (format '%s', expected '%s')", what, folder,
                    n, tostring(meta.format), SHARD_FORMAT), 0)
            end
            files[q + 1] = {h = h, meta = meta, layout = meta.layout and json.decode(meta.layout) or nil,
                            steps = meta.steps and json.decode(meta.steps) or nil, name = n}
        end
    end
    if not S then error(string.format("%s: no shard-*-of-*.safetensors files in %s", what, folder), 0) end
    for q = 0, S - 1 do
        if not files[q + 1] then
            error(string.format("%s: %s lacks %s (a checkpoint written by %d ranks needs all of them)", what, folder,
                shard_name(q, S), S), 0)
        end
    end
    return files, S
end

-- a file's pieces of a parameter (its layout entry l): {r0, n, c0, nc, lc0} each: rows
-- [r0, r0 + n), columns [c0, c0 + nc) (nc nil: every column), found from column lc0 of the
-- file's tensor; an entry without row0 (a consolidated file) is the whole parameter
local function pieces_of(l)
    if l.whole or (l.row0 == nil and l.pieces == nil) then return {{0, l.shape[1] or 1, 0, nil, 0}} end
    if l.pieces then
        local out = {}
        for i, pc in ipairs(l.pieces) do out[i] = {pc.row0, pc.rows, pc.col0 or 0, pc.cols, pc.lcol0 or 0} end
        return out
    end
    return {{l.row0, l.rows, l.col0 or 0, l.cols, 0}}
end

-- gather_box(files, key, name, dst, r0, c0, what, lfiles): fill dst, the part of parameter
-- `name` at rows [r0, r0 + #rows of dst) (and columns [c0, c0 + #columns of dst) for a matrix),
-- from every file's overlapping pieces (tensor `key`; their places from files[i].layout, or from
-- lfiles[i]'s when the tensors come from other files, as the optimizer's do). Every element must
-- be found.
local function gather_box(files, key, name, dst, r0, c0, what, lfiles)
    local n = dst.shape[1] or 1
    local two = #dst.shape >= 2
    local nc = two and dst.shape[2] or 1
    if n <= 0 or nc <= 0 then return end
    local found = 0
    for i, f in ipairs(files) do
        local lf = (lfiles or files)[i]
        local l = lf.layout and lf.layout[name]
        if l and f.h:has(key) then
            local t
            for _, pc in ipairs(pieces_of(l)) do
                local pr0, pn, pc0, pnc, plc = pc[1], pc[2], pc[3], pc[4], pc[5]
                pnc = pnc or (two and l.shape[2]) or 1
                local a, b = math.max(r0, pr0), math.min(r0 + n, pr0 + pn)
                local ca, cb = 0, 1
                if two then ca, cb = math.max(c0, pc0), math.min(c0 + nc, pc0 + pnc) end
                if b > a and cb > ca then
                    t = t or f.h:get_tensor(key)
                    local src = t:narrow(0, a - pr0, b - a)
                    local d = dst:narrow(0, a - r0, b - a)
                    if two and (plc ~= 0 or ca ~= c0 or cb - ca ~= nc or (t.shape[2] or 1) ~= cb - ca) then
                        local s2, d2 = src:narrow(1, plc + ca - pc0, cb - ca), d:narrow(1, ca - c0, cb - ca)
                        src:free(); d:free()
                        src, d = s2, d2
                    end
                    check(C.nemo_copy_(d._c, src._c))
                    src:free(); d:free()
                    found = found + (b - a) * (cb - ca)
                end
            end
            if t then t:free() end
        end
    end
    if found ~= n * nc then
        error(string.format("%s: the checkpoint's files hold only part of '%s' (rows %d..%d%s): a shard file is " ..
            "missing or was written by another run", what, key, r0, r0 + n - 1,
            two and string.format(", columns %d..%d", c0, c0 + nc - 1) or ""), 0)
    end
end

-- fill(files, key, name, dst, info, lr0, what, lfiles): dst, local rows [lr0, ...) of a parameter
-- with tp facts `info` (nil: replicated), from the files: each of its pieces (tensor.pieces)
local function fill(files, key, name, dst, info, lr0, what, lfiles)
    local tpm = require "nemo.parallel.tensor"
    for _, pc in ipairs(tpm.pieces(info, lr0, dst.shape[1] or 1)) do
        local d = pc[4] and dst:narrow(1, pc[5], pc[4]) or dst
        gather_box(files, key, name, d, pc[1], pc[3] or 0, what, lfiles)
        if not rawequal(d, dst) then d:free() end
    end
end

local function shape_of(layout, name, what, folder)
    local l = layout and layout[name]
    if not l then error(string.format("%s: the checkpoint in %s has no parameter '%s'", what, folder, name), 0) end
    return l.shape
end

-- Read parameters (and AdamW state) into `entries` (this rank's rows q*R .. q*R + real of each
-- parameter, written into e.sp) from shard files (files; ofiles for the optimizer, whose
-- steps come from steps_of(name)), and the frozen parameters whole. param_groups (optional)
-- replaces the optimizer's hyperparameters (lr, ...) with the saved ones.
local function load_into(o)
    local what, files, layout, entries, q = o.what, o.files, o.layout, o.entries, o.q
    local n = 0
    for _, l in pairs(layout) do if not l.whole and not l.frozen then n = n + 1 end end
    for _, e in ipairs(entries) do
        local shape = shape_of(layout, e.name, what, o.dir)
        local mine = table.concat(e.tp and e.tp.shape or e.p.shape, "x")
        if table.concat(shape, "x") ~= mine then
            error(string.format("%s: parameter %s is %s in the checkpoint, %s in the model", what, e.name,
                table.concat(shape, "x"), mine), 0)
        end
    end
    if n ~= #entries then
        error(string.format("%s: the checkpoint holds %d trainable parameters, the model %d", what, n, #entries), 0)
    end
    autograd.no_grad(function()
        for _, e in ipairs(entries) do
            if e.sp ~= e.p then check(C.nemo_fill_(e.sp._c, 0)) end
            local dst = e.sp:narrow(0, 0, e.real)
            fill(files, e.name, e.name, dst, e.tp, q * e.R, what)
            dst:free()
        end
        for _, f in ipairs(o.frozen or {}) do
            local l = layout[f[1]]
            if l and (l.whole or l.row0 or l.pieces) then
                local info = rawget(f[2], "_tp")
                local want = info and info.shape or f[2].shape
                if table.concat(l.shape, "x") ~= table.concat(want, "x") then
                    error(string.format("%s: frozen parameter %s is %s in the checkpoint, %s in the model", what, f[1],
                        table.concat(l.shape, "x"), table.concat(want, "x")), 0)
                end
                fill(files, f[1], f[1], f[2], info, 0, what)
            end
        end
    end)
    local optimizer = o.optimizer
    if not optimizer then return end
    local sd = optimizer:state_dict()
    if o.param_groups then
        if #o.param_groups ~= #sd.param_groups then
            error(string.format("%s: the checkpoint has %d optimizer param groups, the optimizer %d", what,
                #o.param_groups, #sd.param_groups), 0)
        end
        for gi, g in ipairs(o.param_groups) do
            for k, v in pairs(g) do if k ~= "params" then sd.param_groups[gi][k] = v end end
        end
    end
    local idx_of, k = {}, 0
    for _, g in ipairs(optimizer.param_groups) do
        for _, p in ipairs(g.params) do k = k + 1; idx_of[p] = k end
    end
    local state = {}
    for _, e in ipairs(entries) do
        local step = o.steps_of(e.name)
        if step then
            local cdt = e.sp.dtype == "float64" and "float64" or "float32"
            local st_ = {step = step}
            for _, key in ipairs { "exp_avg", "exp_avg_sq" } do
                local t = Tensor.zeros(e.sp.shape, {dtype = cdt, device = e.sp.device})
                local dst = t:narrow(0, 0, e.real)
                fill(o.ofiles, key .. "." .. e.name, e.name, dst, e.tp, q * e.R, what, files)
                dst:free()
                st_[key] = t
            end
            local i = idx_of[e.sp]
            if not i then error(what .. ": the optimizer does not hold the parameter " .. e.name, 0) end
            state[i] = st_
        end
    end
    sd.state = state
    optimizer:load_state_dict(sd)
end

local function close_all(files) for _, f in ipairs(files or {}) do f.h:close() end end

-- load_sharded(dir, optimizer[, param_groups]): this rank's shards (and AdamW state) from the
-- shard files of dir, written by any number of ranks.
function FSDP:load_sharded(dir, optimizer, param_groups)
    local what = "FSDP2 load_sharded"
    local files, S = open_shards(dir .. "/model", what)
    local entries, _, q = self:_entries_or_plain()
    local ofiles, OS
    if optimizer then
        ofiles, OS = open_shards(dir .. "/optim", what)
        if OS ~= S then error(string.format("%s: model shards of %d ranks but optimizer shards of %d", what, S, OS), 0) end
    end
    local ok, err = pcall(load_into, {what = what, dir = dir, files = files, layout = files[1].layout,
        entries = entries, q = q, frozen = self.frozen, optimizer = optimizer, ofiles = ofiles,
        param_groups = param_groups, steps_of = function(name) return ofiles[1].steps and ofiles[1].steps[name] end})
    close_all(files); close_all(ofiles)
    if not ok then error(err, 0) end
    -- a new forward gathers the loaded shards
    if self.units then for _, u in ipairs(self.units) do self:_reshard(u) end end
end

-- A consolidated checkpoint (model/model.safetensors, optim/optim.safetensors with moments by
-- optimizer index) seen as one shard file, read by the same code.
local function consolidated_files(dir, names, ostate, with_optim)
    local st = require "nemo.safetensors"
    local mh = st.safe_open(dir .. "/model/model.safetensors")
    local layout = {}
    for _, k in ipairs(mh:keys()) do
        local t = mh:get_tensor(k)
        layout[k] = {shape = t.shape}
        t:free()
    end
    local files = {{h = mh, layout = layout, name = "model/model.safetensors"}}
    local index = {}
    for i, n in ipairs(names) do index[n] = i end
    if not with_optim then return files end
    local oh = st.safe_open(dir .. "/optim/optim.safetensors")
    local proxy = {}   -- "exp_avg.<name>" -> the file's "exp_avg.<index>"
    local function key_of(k)
        local kind, name = k:match("^(exp_avg_sq)%.(.+)$")
        if not kind then kind, name = k:match("^(exp_avg)%.(.+)$") end
        return kind and index[name] and (kind .. "." .. index[name]) or k
    end
    function proxy:has(k) return oh:has(key_of(k)) end
    function proxy:get_tensor(k) return oh:get_tensor(key_of(k)) end
    function proxy:close() oh:close() end
    local ofiles = {{h = proxy, name = "optim/optim.safetensors"}}
    local steps = ostate.steps or {}
    return files, ofiles, function(name) return index[name] and steps[tostring(index[name])] end
end

-- load_consolidated(dir, optimizer, ostate): a checkpoint written without FSDP2 (one
-- model.safetensors) into this rank's shards; ostate is its optim/state.json (optimizer nil:
-- the weights only).
function FSDP:load_consolidated(dir, optimizer, ostate)
    local what = "FSDP2 load (consolidated checkpoint)"
    local entries, _, q = self:_entries_or_plain()
    local names = {}
    for i, e in ipairs(entries) do names[i] = e.name end
    ostate = ostate or {}
    local files, ofiles, steps_of = consolidated_files(dir, names, ostate, optimizer ~= nil)
    for _, f in ipairs(self.frozen or {}) do
        if files[1].layout[f[1]] then files[1].layout[f[1]].whole = true end
    end
    for k, l in pairs(files[1].layout) do   -- buffers and anything else not managed here
        if not l.whole then
            local managed = false
            for _, n in ipairs(names) do if n == k then managed = true; break end end
            if not managed then files[1].layout[k] = nil end
        end
    end
    local ok, err = pcall(load_into, {what = what, dir = dir, files = files, layout = files[1].layout,
        entries = entries, q = q, frozen = self.frozen, optimizer = optimizer, ofiles = ofiles,
        param_groups = ostate.param_groups, steps_of = steps_of})
    close_all(files); close_all(ofiles)
    if not ok then error(err, 0) end
    if self.units then for _, u in ipairs(self.units) do self:_reshard(u) end end
end

-- load_sharded_whole(dir, model, optimizer, param_groups): a sharded checkpoint into a model
-- that is not sharded (one process, DDP): whole parameters and AdamW state.
function M.load_sharded_whole(dir, model, optimizer, param_groups)
    require "nemo"
    local what = "load of a sharded (FSDP2) checkpoint"
    local entries, frozen = {}, {}
    for name, p in model:named_parameters() do
        if rawget(p, "requires_grad") then
            local d0 = #p.shape > 0 and p.shape[1] or 1
            entries[#entries + 1] = {name = name, p = p, sp = p, d0 = d0, R = d0, real = d0}
        else
            frozen[#frozen + 1] = {name, p}
        end
    end
    local files = open_shards(dir .. "/model", what)
    local ofiles
    if optimizer then ofiles = open_shards(dir .. "/optim", what) end
    local ok, err = pcall(load_into, {what = what, dir = dir, files = files, layout = files[1].layout,
        entries = entries, q = 0, frozen = frozen, optimizer = optimizer, ofiles = ofiles,
        param_groups = param_groups, steps_of = function(name) return ofiles[1].steps and ofiles[1].steps[name] end})
    close_all(files); close_all(ofiles)
    if not ok then error(err, 0) end
end

-- load_full(dir) -> {name = tensor}, names (checkpoint order): whole parameters from the shard
-- files of dir/model (written by any number of ranks).
function M.load_full(dir)
    require "nemo"   -- the tensor methods come with the ops (a cycle if required at the top)
    local what = "FSDP2 load_full"
    local files, S = open_shards(dir .. "/model", what)
    local layout = files[1].layout
    local names = {}
    for k in pairs(layout) do names[#names + 1] = k end
    table.sort(names)
    local out = {}
    for _, name in ipairs(names) do
        local shape = layout[name].shape
        if layout[name].whole then
            out[name] = files[1].h:get_tensor(name):clone()
        else
            local dtype
            for q = 1, S do
                if files[q].h:has(name) then dtype = files[q].h:get_tensor(name).dtype; break end
            end
            local t = Tensor.zeros(shape, {dtype = dtype or "float32"})
            gather_box(files, name, name, t, 0, 0, what)
            out[name] = t
        end
    end
    for _, f in ipairs(files) do f.h:close() end
    return out, names
end

-- Facts: {units, shard, replicate, bytes: all_gather / reduce_scatter / all_reduce so far, comm_seconds}
function FSDP:info()
    return {units = self.units and #self.units or 0, shard = self.S or 1, replicate = self.R or 1,
            params = #(self.names or {}), stats = self.stats, last = self.last}
end

function FSDP:reset_stats()
    for k in pairs(self.stats) do self.stats[k] = 0 end
end

-- wrap(model, opts) -> manager: FSDP2Manager(opts):parallelize(model), the one-liner.
function M.wrap(model, opts)
    local mgr = M.FSDP2Manager(opts)
    mgr:parallelize(model)
    return mgr
end

return M
