-- lua/nemo/parallel/mesh.lua: the DeviceMesh. Sizes dp_size, dp_replicate_size, tp_size, cp_size,
-- pp_size, ep_size (Automodel's keys) lay the world's ranks out as a row-major grid of shape
-- (pp, dp_replicate, dp_shard = dp / dp_replicate, cp, tp), with the flattened axes
--   dp = (dp_replicate, dp_shard), dp_shard_cp = (dp_shard, cp), dp_cp = (dp_replicate, dp_shard, cp).
-- mesh:get_group(name) is the nemo.dist group of this rank along that axis.
--
--   local mesh = DeviceMesh{dp_size = 4, dp_replicate_size = 2}
--   mesh:size("dp_shard") --> 2;  mesh:get_local_rank("dp") --> this rank's index among the 4
--
-- Non-obvious rules:
-- - A size left out, nil, or <= 0 means 1, as in Automodel; dp_size left out is inferred as
--   world / (tp x cp x pp). The product of the grid must equal the world size.
-- - pp and ep > 1 are refused with an error naming the key: nemo-lua cannot run them yet, and a
--   dimension is never silently ignored. cp (context parallelism) runs under FSDP2, which then
--   shards over dp_shard_cp (nemo.parallel.context); so does tp (tensor parallelism, the
--   fastest axis: the tp ranks of a group are neighbours; nemo.parallel.tensor), not under DDP.
-- - Groups are created at construction, in one fixed order on every rank (MPI_Comm_split is
--   collective). Axes with the same member ranks share one group; an axis that spans the whole
--   world uses the world group.
local M = {}

local DIMS = {"pp", "dp_replicate", "dp_shard", "cp", "tp"}
local FLAT = {dp = {"dp_replicate", "dp_shard"}, dp_shard_cp = {"dp_shard", "cp"},
              dp_cp = {"dp_replicate", "dp_shard", "cp"}}
local FLAT_ORDER = {"dp", "dp_shard_cp", "dp_cp"}
local KEYS = {"dp_size", "dp_replicate_size", "tp_size", "cp_size", "pp_size", "ep_size"}
M.DIMS, M.KEYS = DIMS, KEYS

local UNSUPPORTED = {pp_size = "pipeline parallelism", ep_size = "expert parallelism"}

local DeviceMesh = {}
DeviceMesh.__index = DeviceMesh
M.DeviceMeshClass = DeviceMesh

local function size_of(opts, k, what)
    local v = opts[k]
    if v == nil or type(v) == "userdata" then return 1, false end   -- nil or YAML/JSON null
    if type(v) ~= "number" or v % 1 ~= 0 then
        error(string.format("%s: %s must be an integer, got %s", what, k, tostring(v)), 4)
    end
    if v <= 0 then return 1, false end
    return v, true
end

-- DeviceMesh{dp_size=, dp_replicate_size=, tp_size=, cp_size=, pp_size=, ep_size=,
--            world_size=, rank=, manager = "fsdp2"|"ddp", create_groups = true}
-- world_size / rank default to nemo.dist's; groups are created when the process group is up.
function M.DeviceMesh(opts)
    opts = opts or {}
    local what = "DeviceMesh"
    local known = {world_size = true, rank = true, manager = true, create_groups = true}
    for _, k in ipairs(KEYS) do known[k] = true end
    for k in pairs(opts) do
        if not known[k] then
            error(string.format("%s: unknown option '%s' (known: %s, world_size, rank, manager, create_groups)", what,
                tostring(k), table.concat(KEYS, ", ")), 2)
        end
    end
    local dist = require "nemo.dist"
    local world = opts.world_size or dist.get_world_size()
    local rank = opts.rank or dist.get_rank()
    local s = {}
    for _, k in ipairs(KEYS) do s[k] = size_of(opts, k, what) end
    if s.tp_size > 1 and opts.manager == "ddp" then
        error(string.format("%s: tp_size = %d: tensor parallelism runs under FSDP2 (as in Automodel), not DDP", what,
            s.tp_size), 2)
    end
    for _, k in ipairs { "pp_size", "ep_size" } do
        if s[k] > 1 then
            error(string.format("%s: %s = %d: %s is not supported yet in nemo-lua (set %s to 1; data, context " ..
                "and tensor parallelism with dp_size / dp_replicate_size, cp_size and tp_size are)", what, k, s[k],
                UNSUPPORTED[k], k), 2)
        end
    end
    local tp, cp, pp, ep = s.tp_size, s.cp_size, s.pp_size, s.ep_size
    local dp = s.dp_size
    local _, given = size_of(opts, "dp_size", what)
    if not given then
        if world % (tp * cp * pp) ~= 0 then
            error(string.format("%s: the world size %d is not divisible by tp_size x cp_size x pp_size = %d", what,
                world, tp * cp * pp), 2)
        end
        dp = math.floor(world / (tp * cp * pp))
    end
    local rep = s.dp_replicate_size
    if dp % rep ~= 0 then
        error(string.format("%s: dp_size (%d) must be a multiple of dp_replicate_size (%d)", what, dp, rep), 2)
    end
    if opts.manager == "fsdp2" and rep ~= 1 and rep >= dp then
        error(string.format("%s: dp_replicate_size (%d) >= dp_size (%d) shards nothing: that is DDP, which FSDP2 " ..
            "does not run (use the ddp manager, or a dp_replicate_size below dp_size)", what, rep, dp), 2)
    end
    if (dp * cp * tp) % ep ~= 0 then
        error(string.format("%s: dp_size x cp_size x tp_size = %d must be a multiple of ep_size (%d)", what,
            dp * cp * tp, ep), 2)
    end
    local total = pp * dp * cp * tp
    if total ~= world then
        error(string.format("%s: pp_size x dp_size x cp_size x tp_size = %d x %d x %d x %d = %d does not match the " ..
            "world size %d%s", what, pp, dp, cp, tp, total, world,
            given and string.format(" (leave dp_size out to infer it, or set it to %d)",
                math.floor(world / (tp * cp * pp))) or ""), 2)
    end
    if rank < 0 or rank >= world then
        error(string.format("%s: rank %d is outside the world of %d", what, rank, world), 2)
    end
    local self = setmetatable({world_size = world, rank = rank, sizes = s, dp_size = dp, manager = opts.manager,
                               mesh_dim_names = DIMS, groups = {}, _owned = {}}, DeviceMesh)
    self.shape = {pp, rep, math.floor(dp / rep), cp, tp}
    self.dim_size = {}
    for i, n in ipairs(DIMS) do self.dim_size[n] = self.shape[i] end
    -- this rank's coordinate on each axis (row-major, tp fastest)
    self.coord = {}
    local r = rank
    for i = #DIMS, 1, -1 do
        local n = self.shape[i]
        self.coord[DIMS[i]] = r % n
        r = math.floor(r / n)
    end
    local create = opts.create_groups
    if create == nil then create = dist.is_initialized() end
    if create then self:_create_groups() end
    return self
end

local function axes_of(name)
    if FLAT[name] then return FLAT[name] end
    for _, d in ipairs(DIMS) do if d == name then return {d} end end
    return nil
end

local function check_name(name, what)
    local axes = axes_of(name)
    if not axes then
        local all = {}
        for _, d in ipairs(DIMS) do all[#all + 1] = d end
        for _, d in ipairs(FLAT_ORDER) do all[#all + 1] = d end
        error(string.format("%s: no mesh axis '%s' (axes: %s)", what, tostring(name), table.concat(all, ", ")), 3)
    end
    return axes
end

-- Number of ranks along an axis (or a flattened axis); nil for the whole mesh.
function DeviceMesh:size(name)
    if name == nil then return self.world_size end
    local n = 1
    for _, a in ipairs(check_name(name, "DeviceMesh:size")) do n = n * self.dim_size[a] end
    return n
end

-- This rank's index along an axis (row-major over a flattened axis' parts).
function DeviceMesh:get_local_rank(name)
    local idx = 0
    for _, a in ipairs(check_name(name, "DeviceMesh:get_local_rank")) do
        idx = idx * self.dim_size[a] + self.coord[a]
    end
    return idx
end

-- The ranks of this rank's group along an axis, in group order (0-based world ranks).
function DeviceMesh:group_ranks(name)
    local axes = check_name(name, "DeviceMesh:group_ranks")
    local inside = {}
    for _, a in ipairs(axes) do inside[a] = true end
    local out = {}
    for r = 0, self.world_size - 1 do
        local c, x, same = {}, r, true
        for i = #DIMS, 1, -1 do
            c[DIMS[i]] = x % self.shape[i]
            x = math.floor(x / self.shape[i])
        end
        for _, d in ipairs(DIMS) do
            if not inside[d] and c[d] ~= self.coord[d] then same = false end
        end
        if same then out[#out + 1] = r end
    end
    return out
end

function DeviceMesh:_create_groups()
    local dist = require "nemo.dist"
    local by_members = {}
    local order = {}
    for _, d in ipairs(DIMS) do order[#order + 1] = d end
    for _, d in ipairs(FLAT_ORDER) do order[#order + 1] = d end
    for _, name in ipairs(order) do
        local axes = axes_of(name)
        -- members depend only on the axes of size > 1
        local sig = {}
        for _, a in ipairs(axes) do if self.dim_size[a] > 1 then sig[#sig + 1] = a end end
        local key = table.concat(sig, ",")
        local g = by_members[key]
        if not g then
            if self:size(name) == self.world_size then
                g = dist.group_world()
            else
                -- color: this rank's coordinates off the axes; key: its index along them
                local inside = {}
                for _, a in ipairs(axes) do inside[a] = true end
                local color = 0
                for _, d in ipairs(DIMS) do
                    if not inside[d] then color = color * self.dim_size[d] + self.coord[d] end
                end
                g = dist.new_subgroup(color, self:get_local_rank(name), name)
                self._owned[#self._owned + 1] = g
            end
            by_members[key] = g
        end
        self.groups[name] = g
    end
end

-- The nemo.dist group of this rank along an axis.
function DeviceMesh:get_group(name)
    check_name(name, "DeviceMesh:get_group")
    local g = self.groups[name]
    if not g then
        error("DeviceMesh:get_group: the mesh has no groups (the process group was not initialized when it was " ..
              "built; call nemo.dist.init_process_group() first)", 2)
    end
    return g
end

-- Free the groups this mesh created (every rank must call it).
function DeviceMesh:destroy()
    for _, g in ipairs(self._owned) do g:destroy() end
    self._owned = {}
    self.groups = {}
end

function DeviceMesh:__tostring()
    local parts = {}
    for i, d in ipairs(DIMS) do parts[i] = d .. "=" .. self.shape[i] end
    return string.format("DeviceMesh(%s; rank %d of %d)", table.concat(parts, ", "), self.rank, self.world_size)
end

return M
