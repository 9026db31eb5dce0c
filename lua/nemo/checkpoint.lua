-- lua/nemo/checkpoint.lua: training checkpoints (what lua/nemo/train.lua saves and resumes from).
--
-- <checkpoint_dir>/epoch_<E>_step_<S>/      S = the 0-based index of the last step taken, E its epoch
--   model/model.safetensors                  the trained module's state_dict (names as diffusers), or,
--   model/shard-QQQQQ-of-SSSSS.safetensors   under FSDP2, each shard's rows (nemo.parallel.fsdp2), or,
--   model/adapter_model.safetensors          a LoRA run (s.peft): the adapters only, with
--   model/adapter_config.json                adapter_config.json and automodel_peft_config.json
--                                            (nemo.peft.save_adapter, Automodel's layout; under
--                                            FSDP2 beside the shards of the adapters)
--   model/config.json                        the model config (the resume compatibility check)
--   optim/optim.safetensors                  AdamW moments: exp_avg.<i>, exp_avg_sq.<i> (i = torch's index)
--                                            (optim/shard-QQQQQ-of-SSSSS.safetensors under FSDP2)
--   optim/state.json                         step counts, param groups, the LR schedule's state
--   trainer.json                             step, epoch, RNG states, data-sampler position
--   config.yaml                              the resolved run config (JSON text, which YAML reads)
--   diffusers/                               optional: the consolidated pipeline (save_consolidated)
--   losses.json                              {"train_loss": the step's loss, "val_loss": its validation
--                                            loss when the step validated} (as Automodel writes it)
-- <checkpoint_dir>/LATEST                    one line: the name of the newest complete checkpoint
-- <checkpoint_dir>/LOWEST_VAL                one line: the checkpoint with the lowest val_loss (as
--                                            Automodel's LOWEST_VAL link; a run with validation)
--
-- The non-obvious rule: nothing half-written is ever taken for a checkpoint. A checkpoint is
-- written into "<name>.incomplete" and renamed when every file is there; LATEST is replaced
-- atomically (temporary file + rename) after that. latest() follows LATEST only when it names a
-- complete folder, else takes the complete folder with the highest step; "*.incomplete" folders
-- are never candidates and an explicit restore_from naming one is an error. With several ranks,
-- rank 0 makes the folder, every rank writes its part (FSDP2: its shards), rank 0 writes the rest
-- and publishes it after a barrier, so no rank ever sees a half-written checkpoint.
local fs = require "nemo.fs"
local json = require "nemo.json"

local M = {}

local function st() return require "nemo.safetensors" end

-- Files every complete checkpoint holds (relative to its folder); a sharded (FSDP2) checkpoint
-- holds shard 0 of the model and optimizer instead of the two single files (and the loader
-- checks that every shard is there).
M.REQUIRED = {"model/model.safetensors", "optim/optim.safetensors", "optim/state.json", "trainer.json"}
local SHARDED_ALT = {["model/model.safetensors"] = "model", ["optim/optim.safetensors"] = "optim"}
-- a LoRA checkpoint holds the adapters instead of the whole model
local ADAPTER_ALT = {["model/model.safetensors"] = "model/adapter_model.safetensors"}

-- Is dir/<sub> a folder of FSDP2 shard files?
local load_ema   -- (defined with load)

local function has_shards(dir, sub)
    if not fs.isdir(dir .. "/" .. sub) then return false end
    for _, n in ipairs(fs.list(dir .. "/" .. sub)) do
        if n:match("^shard%-00000%-of%-%d+%.safetensors$") then return true end
    end
    return false
end
M.is_sharded = function(dir) return has_shards(dir, "model") end

local function missing_files(dir)
    local missing = {}
    for _, f in ipairs(M.REQUIRED) do
        if not fs.isfile(dir .. "/" .. f) and not (SHARDED_ALT[f] and has_shards(dir, SHARDED_ALT[f])) and
           not (ADAPTER_ALT[f] and fs.isfile(dir .. "/" .. ADAPTER_ALT[f])) then
            missing[#missing + 1] = f
        end
    end
    return missing
end

local function write_text(path, text)
    local tmp = path .. ".tmp"
    local f, err = io.open(tmp, "wb")
    if not f then error("checkpoint: cannot write '" .. path .. "': " .. tostring(err), 3) end
    f:write(text)
    f:close()
    fs.rename(tmp, path)
end

function M.name(epoch, step) return string.format("epoch_%d_step_%d", epoch, step) end

-- parse(name) -> epoch, step for "epoch_E_step_S" (exactly), else nil.
function M.parse(name)
    local e, s = tostring(name):match("^epoch_(%d+)_step_(%d+)$")
    if not s then return nil end
    return tonumber(e), tonumber(s)
end

-- Is dir a complete checkpoint (the name is not *.incomplete and every required file exists)?
function M.is_complete(dir)
    if not fs.isdir(dir) or dir:match("%.incomplete/*$") then return false end
    return #missing_files(dir) == 0
end

-- list(root) -> the complete checkpoints under root, oldest first:
-- {{name=, path=, epoch=, step=}, ...} (sorted by step, then epoch).
function M.list(root)
    local out = {}
    if not fs.isdir(root) then return out end
    for _, n in ipairs(fs.list(root)) do
        local e, s = M.parse(n)
        local p = root .. "/" .. n
        if s and M.is_complete(p) then out[#out + 1] = {name = n, path = p, epoch = e, step = s} end
    end
    table.sort(out, function(a, b) if a.step ~= b.step then return a.step < b.step end return a.epoch < b.epoch end)
    return out
end

-- The name LATEST (or the pointer file `which`, e.g. "LOWEST_VAL") holds (nil when there is no such file).
function M.read_latest(root, which)
    local p = root .. "/" .. (which or "LATEST")
    if not fs.isfile(p) then return nil end
    local name = fs.read(p):gsub("%s+$", "")
    if name == "" then return nil end
    return name
end

-- The newest complete checkpoint under root: the one LATEST names if it is complete, else the
-- complete one with the highest step; nil when there is none.
function M.latest(root)
    if not fs.isdir(root) then return nil end
    local name = M.read_latest(root)
    if name and not name:find("/", 1, true) and M.is_complete(root .. "/" .. name) then return root .. "/" .. name end
    local all = M.list(root)
    return all[#all] and all[#all].path or nil
end

-- save(root, {epoch=, step=, model=, optimizer=, scheduler=, trainer=, config=, model_config=,
--            extra = fn(tmp) (rank 0), extra_all = fn(tmp) (every rank: collective exports),
--            manager = the FSDP2 manager of a sharded run, group = nemo.dist group (several ranks),
--            peft = {config = PeftConfig, base = model path} (a LoRA run: adapters only),
--            ema = {model = nemo.ema EMAModel, params =, names =} (the averages of params, into
--            ema/: ema/model/ as the weights are saved, ema/state.json; with peft also
--            ema/adapter_model.safetensors + adapter_config.json, the averaged adapters)})
-- -> the checkpoint's folder. Every rank of group calls it. extra writes more into the checkpoint
-- before it is published (the diffusers export).
-- publish: tmp becomes root/name (an older folder of that name is moved aside first, never
-- deleted before the new one is in place), then LATEST (and LOWEST_VAL) name it
local function publish(root, name, tmp, final, lowest_val)
    local old
    if fs.exists(final) then
        old = final .. ".old.incomplete"
        if fs.exists(old) then fs.remove_tree(old) end
        fs.rename(final, old)
    end
    fs.rename(tmp, final)
    fs.sync_dir(root)
    write_text(root .. "/LATEST", name .. "\n")
    if lowest_val then write_text(root .. "/LOWEST_VAL", name .. "\n") end
    fs.sync_dir(root)
    if old then pcall(fs.remove_tree, old) end
end

function M.save(root, s)
    local g = s.group
    local multi = g ~= nil and g:size() > 1
    local main = not multi or g:rank() == 0
    local dist = multi and require "nemo.dist" or nil
    local sharded = s.manager ~= nil
    local name = M.name(s.epoch, s.step)
    local final = root .. "/" .. name
    local tmp = final .. ".incomplete"
    if main then
        fs.mkdirs(root)
        if fs.exists(tmp) then fs.remove_tree(tmp) end
        fs.mkdirs(tmp .. "/model")
        fs.mkdirs(tmp .. "/optim")
    end
    if multi then dist.barrier{group = g} end
    -- s.async: the tensor files are written by background threads from copies taken now
    -- (safetensors.in_background); the checkpoint is published by M.finish(pending)
    local jobs = {}
    local function bg(fn, ...)
        if not s.async then return fn(...) end
        for _, j in ipairs(st().in_background(fn, ...)) do jobs[#jobs + 1] = j end
    end
    -- the parts every rank writes; a failure anywhere stops the job (the caller aborts it)
    local peft = s.peft and require "nemo.peft"
    if sharded then bg(s.manager.save_sharded, s.manager, tmp, s.optimizer, {frozen = not s.peft}) end
    if sharded and s.peft then   -- the whole adapters, gathered, for export and inference
        s.manager:summon_full_params(function()
            if main then peft.save_adapter(s.model, tmp .. "/model", s.peft.config, {base = s.peft.base}) end
        end)
    end
    if s.ema then   -- the averages, saved as the weights are (shards, or one file of the trainable ones)
        if main then fs.mkdirs(tmp .. "/ema/model") end
        if multi then dist.barrier{group = g} end
        bg(s.ema.model.swap, s.ema.model, s.ema.params, function()
            if sharded then
                s.manager:save_sharded(tmp .. "/ema", nil, {frozen = false})
            elseif main then
                local tensors = {}
                for i, n in ipairs(s.ema.names) do tensors[n] = s.ema.params[i] end
                st().save_file(tensors, tmp .. "/ema/model/model.safetensors", {format = "pt"})
            end
            if s.peft then   -- the averaged adapters also in the adapter layout, for inference
                local function write() peft.save_adapter(s.model, tmp .. "/ema", s.peft.config, {base = s.peft.base}) end
                if sharded then s.manager:summon_full_params(function() if main then write() end end)
                elseif main then write() end
            end
        end)
        if main then json.write_file(tmp .. "/ema/state.json", s.ema.model:state()) end
    end
    if s.extra_all then s.extra_all(tmp) end
    local pending = s.async and {root = root, name = name, final = final, tmp = tmp, jobs = jobs, group = g,
                                 multi = multi, main = main, lowest_val = s.lowest_val} or nil
    if multi then dist.barrier{group = g} end
    if not main then
        if pending then return pending end
        dist.barrier{group = g}   -- rank 0 publishes
        return final
    end
    local ok, err = pcall(function()
        -- model
        if not sharded and s.peft then
            peft.save_adapter(s.model, tmp .. "/model", s.peft.config, {base = s.peft.base})
        elseif not sharded then
            local sd, keys = s.model:state_dict()
            local tensors = {}
            if keys then for _, k in ipairs(keys) do tensors[k] = sd[k] end else tensors = sd end
            bg(st().save_file, tensors, tmp .. "/model/model.safetensors", {format = "pt"})
        end
        if s.model_config then json.write_file(tmp .. "/model/config.json", s.model_config) end
        -- optimizer
        local osd = s.optimizer:state_dict()
        if sharded then osd.state = {} end   -- the moments and steps are in the optimizer shards
        local otensors, ostate = {}, {param_groups = {}, steps = {}}
        for i, g in ipairs(osd.param_groups) do
            local copy = {}
            for k, v in pairs(g) do if k ~= "params" then copy[k] = v end end
            copy.params = json.array(g.params)
            ostate.param_groups[i] = copy
        end
        for idx, v in pairs(osd.state) do
            otensors["exp_avg." .. idx] = v.exp_avg
            otensors["exp_avg_sq." .. idx] = v.exp_avg_sq
            ostate.steps[tostring(idx)] = v.step
        end
        if not sharded then bg(st().save_file, otensors, tmp .. "/optim/optim.safetensors", {format = "nemo"}) end
        ostate.sharded = sharded or nil
        ostate.scheduler = s.scheduler and s.scheduler:state_dict() or nil
        json.write_file(tmp .. "/optim/state.json", ostate)
        -- the config, anything extra, and last trainer.json (so a folder holding it is complete)
        write_text(tmp .. "/config.yaml", json.encode(s.config or {}, {indent = 2}) .. "\n")
        if s.extra then s.extra(tmp) end
        if s.losses then json.write_file(tmp .. "/losses.json", s.losses) end
        local trainer = {}
        for k, v in pairs(s.trainer or {}) do trainer[k] = v end
        trainer.epoch, trainer.step = s.epoch, s.step
        json.write_file(tmp .. "/trainer.json", trainer)
    end)
    if not ok then
        pcall(st().wait, jobs)
        pcall(fs.remove_tree, tmp)
        error("checkpoint: saving " .. final .. " failed: " .. tostring(err), 2)
    end
    if pending then return pending end
    publish(root, name, tmp, final, s.lowest_val)
    if multi then dist.barrier{group = g} end
    return final
end

-- finish(pending) -> the checkpoint folder: an async save (s.async) completed: every rank's
-- background writes joined, then rank 0 publishes it (rename, LATEST, LOWEST_VAL). Every rank
-- calls it. A failed write leaves the folder unpublished (".incomplete") and raises.
function M.finish(p)
    local ok, err = pcall(st().wait, p.jobs)
    local dist = p.multi and require "nemo.dist" or nil
    if p.multi then   -- whether every rank's writes succeeded
        local bad = dist.all_reduce_number(ok and 0 or 1, "max", p.group)
        if bad > 0 and ok then ok, err = false, "another rank's write failed" end
    end
    if not ok then
        if p.main then pcall(fs.remove_tree, p.tmp) end
        error("checkpoint: saving " .. p.final .. " failed: " .. tostring(err), 2)
    end
    if p.main then publish(p.root, p.name, p.tmp, p.final, p.lowest_val) end
    if p.multi then dist.barrier{group = p.group} end
    return p.final
end

-- prune(root, keep) keeps the `keep` newest complete checkpoints (by step) and the ones LATEST
-- and LOWEST_VAL name; removes the older ones. Returns the removed names.
function M.prune(root, keep)
    if keep == nil then return {} end
    if type(keep) ~= "number" or keep < 1 or keep % 1 ~= 0 then
        error("checkpoint.prune: keep must be a positive integer, got " .. tostring(keep), 2)
    end
    local all = M.list(root)
    local latest, lowest = M.read_latest(root), M.read_latest(root, "LOWEST_VAL")
    local removed = {}
    for i = 1, #all - keep do
        local c = all[i]
        if c.name ~= latest and c.name ~= lowest then
            fs.remove_tree(c.path)
            removed[#removed + 1] = c.name
        end
    end
    return removed
end

-- Remove leftover "*.incomplete" folders (saves that did not finish). Returns their names.
function M.clean_incomplete(root)
    local removed = {}
    if not fs.isdir(root) then return removed end
    for _, n in ipairs(fs.list(root)) do
        if n:match("%.incomplete$") and fs.isdir(root .. "/" .. n) then
            fs.remove_tree(root .. "/" .. n)
            removed[#removed + 1] = n
        end
    end
    return removed
end

-- resolve(restore_from, root) -> a checkpoint folder or nil.
--   nil                  -> nil (the caller looks for the newest under root itself)
--   "LATEST" / "latest"  -> latest(root), nil when root holds none
--   a name               -> root/name
--   a path               -> that checkpoint; a checkpoint_dir (holding LATEST or epoch_* folders)
--                           -> its newest; a LATEST or LOWEST_VAL file -> the checkpoint it names
-- An explicit checkpoint that does not exist, is incomplete or is a "*.incomplete" folder is an
-- error naming it.
function M.resolve(restore_from, root)
    if restore_from == nil or restore_from == json.null then return nil end
    if type(restore_from) ~= "string" or restore_from == "" then
        error("checkpoint.restore_from: expected a checkpoint name or path, got " .. tostring(restore_from), 2)
    end
    if restore_from == "LATEST" or restore_from == "latest" then return root and M.latest(root) or nil end
    local path = restore_from:gsub("/+$", "")
    if not fs.exists(path) and root and fs.exists(root .. "/" .. path) then path = root .. "/" .. path end
    if fs.isfile(path) and (fs.basename(path) == "LATEST" or fs.basename(path) == "LOWEST_VAL") then
        local dir = fs.dirname(path)
        local name = M.read_latest(dir, fs.basename(path))
        if not name then error("checkpoint.restore_from: " .. path .. " is empty", 2) end
        path = dir .. "/" .. name
    end
    if not fs.exists(path) then
        error("checkpoint.restore_from: no checkpoint at '" .. restore_from .. "'" ..
            (root and (" (nor at " .. root .. "/" .. restore_from .. ")") or ""), 2)
    end
    if path:match("%.incomplete$") then
        error("checkpoint.restore_from: '" .. path .. "' is an incomplete checkpoint (a save that did not finish); " ..
            "use a complete one (see " .. fs.dirname(path) .. "/LATEST)", 2)
    end
    if fs.isdir(path) and not fs.isfile(path .. "/trainer.json") then
        -- a checkpoint_dir rather than a checkpoint?
        local newest = M.latest(path)
        if newest then return newest end
    end
    if not M.is_complete(path) then
        local missing = missing_files(path)
        error("checkpoint.restore_from: '" .. path .. "' is not a complete checkpoint (missing: " ..
            table.concat(missing, ", ") .. ")", 2)
    end
    return path
end

-- The model config stored with a checkpoint (nil if none).
function M.model_config(dir)
    local p = dir .. "/model/config.json"
    if fs.isfile(p) then return json.read_file(p) end
    return nil
end

-- The trainer state (trainer.json) of a checkpoint.
function M.trainer_state(dir) return json.read_file(dir .. "/trainer.json") end

-- the averages of s.ema (save's ema) from dir/ema, whatever layout wrote them; a checkpoint
-- without them (written before EMA was turned on) starts them from the loaded weights. Returns
-- true when they were loaded.
load_ema = function(dir, s)
    if not s.ema then return false end
    local e, edir = s.ema, dir .. "/ema"
    if not fs.isfile(edir .. "/state.json") then
        e.model:reset(e.params)
        return false
    end
    local ok, err = pcall(function()
        e.model:swap(e.params, function()   -- the loads write into the parameters, which hold the averages' slots
            local ck_sharded = has_shards(edir, "model")
            if s.manager and ck_sharded then s.manager:load_sharded(edir, nil)
            elseif s.manager then s.manager:load_consolidated(edir, nil)
            elseif ck_sharded then require("nemo.parallel.fsdp2").load_sharded_whole(edir, s.model, nil)
            else
                local w = st().load_file(edir .. "/model/model.safetensors")
                for i, n in ipairs(e.names) do
                    if not w[n] then error("ema/model/model.safetensors has no '" .. n .. "'", 0) end
                    require("nemo.autograd").no_grad(function() e.params[i]:detach():copy_(w[n]) end)
                end
            end
        end)
        e.model:load_state(json.read_file(edir .. "/state.json"))
    end)
    if not ok then error("checkpoint " .. dir .. ": the EMA weights: " .. tostring(err), 0) end
    return true
end

-- load(dir, {model=, optimizer=, scheduler=, manager=, ema=}) restores in place and returns trainer.json.
-- With s.manager (an FSDP2 manager of a sharded run) the shards are read into this rank's
-- shards, whatever number of ranks wrote them; a consolidated checkpoint is read into the shards
-- too; a sharded checkpoint read by a run without FSDP2 is assembled whole.
function M.load(dir, s)
    local missing = missing_files(dir)
    if #missing > 0 then error("checkpoint " .. dir .. " is incomplete: " .. missing[1] .. " is missing", 2) end
    local ck_sharded = has_shards(dir, "model")
    if s.manager and not ck_sharded and not fs.isfile(dir .. "/model/model.safetensors") then
        error("checkpoint " .. dir .. " holds LoRA adapters written without FSDP2 sharding; resume it without the " ..
            "fsdp block (or with ddp), as it was written", 2)
    end
    if s.manager or ck_sharded then
        local ostate = json.read_file(dir .. "/optim/state.json")
        local fsdp2 = require "nemo.parallel.fsdp2"
        local ok, err = pcall(function()
            if s.manager and ck_sharded then
                s.manager:load_sharded(dir, s.optimizer, ostate.param_groups)
            elseif s.manager then
                s.manager:load_consolidated(dir, s.optimizer, ostate)
            else
                fsdp2.load_sharded_whole(dir, s.model, s.optimizer, ostate.param_groups)
            end
        end)
        if not ok then error("checkpoint " .. dir .. ": " .. tostring(err), 2) end
        if s.scheduler and ostate.scheduler then s.scheduler:load_state_dict(ostate.scheduler) end
        load_ema(dir, s)
        return json.read_file(dir .. "/trainer.json")
    end
    local ok, err
    if not fs.isfile(dir .. "/model/model.safetensors") then   -- a LoRA checkpoint: the adapters
        ok, err = pcall(require("nemo.peft").load_adapter, s.model, dir .. "/model")
    else
        local weights = st().load_file(dir .. "/model/model.safetensors")
        ok, err = pcall(s.model.load_state_dict, s.model, weights, {strict = true})
    end
    if not ok then error("checkpoint " .. dir .. ": " .. tostring(err), 2) end
    local ostate = json.read_file(dir .. "/optim/state.json")
    local otensors = st().load_file(dir .. "/optim/optim.safetensors")
    local state = {}
    for idx, step in pairs(ostate.steps or {}) do
        local i = tonumber(idx)
        state[i] = {step = step, exp_avg = otensors["exp_avg." .. idx], exp_avg_sq = otensors["exp_avg_sq." .. idx]}
    end
    local ok2, err2 = pcall(s.optimizer.load_state_dict, s.optimizer, {state = state, param_groups = ostate.param_groups})
    if not ok2 then error("checkpoint " .. dir .. ": " .. tostring(err2), 2) end
    if s.scheduler and ostate.scheduler then s.scheduler:load_state_dict(ostate.scheduler) end
    load_ema(dir, s)
    return json.read_file(dir .. "/trainer.json")
end

-- The whole weights under dir/model: model.safetensors, or the shards of any layout assembled
-- (FSDP2 / tp pieces); nil when there are neither.
local function whole_weights(dir)
    if fs.isfile(dir .. "/model/model.safetensors") then return st().load_file(dir .. "/model/model.safetensors") end
    if has_shards(dir, "model") then return require("nemo.parallel.fsdp2").load_full(dir) end
    return nil
end

-- load_weights(path, model) -> the checkpoint folder: a training checkpoint's transformer weights
-- into model (for sampling): path is a checkpoint, a checkpoint_dir (its newest) or a LATEST
-- or LOWEST_VAL file; model/model.safetensors or FSDP2 shards written by any number of ranks, loaded strictly.
-- A LoRA checkpoint (adapters only) is an error pointing at peft.load_adapter.
function M.load_weights(path, model)
    local dir = M.resolve(path)
    if not dir then error("checkpoint.load_weights: '" .. tostring(path) .. "' names no checkpoint (an empty checkpoint_dir?)", 2) end
    if fs.isfile(dir .. "/model/adapter_model.safetensors") then
        error(string.format("checkpoint %s holds LoRA adapters, not the model's weights: load them as an adapter " ..
            "(model.lora_weights: %s/model, or nemo.peft.load_adapter)", dir, dir), 2)
    end
    local rok, weights = pcall(whole_weights, dir)
    if not rok then error("checkpoint " .. dir .. ": " .. tostring(weights), 2) end
    if not weights then error("checkpoint " .. dir .. ": no model/model.safetensors and no model shards", 2) end
    local ok, err = pcall(model.load_state_dict, model, weights, {strict = true})
    if not ok then error("checkpoint " .. dir .. ": " .. tostring(err), 2) end
    return dir
end

-- export(path, {out =, model = nil, ema = false, force = false, log = nil}) -> out: a training
-- checkpoint as a diffusers pipeline folder, as the recipe's final export writes it (the
-- transformer, and the source pipeline's other components carried over). path: a checkpoint,
-- a checkpoint_dir (its newest), or a LATEST / LOWEST_VAL file. The source pipeline is the run's
-- model.pretrained_model_name_or_path (from the checkpoint's config.yaml) unless model = is given;
-- pretrain runs rebuild it with from_config. ema = true exports the averages (ema/). A LoRA
-- checkpoint's adapter is merged into the source weights. out must not exist unless force (the
-- folder is then replaced only once the new one is complete).
function M.export(path, o)
    o = o or {}
    local log = o.log or function() end
    if type(o.out) ~= "string" or o.out == "" then error("checkpoint.export: out (a folder) is required", 2) end
    local dir = M.resolve(path)
    if not dir then error("checkpoint.export: '" .. tostring(path) .. "' names no checkpoint", 2) end
    if fs.exists(o.out) and not o.force then
        error("checkpoint.export: " .. o.out .. " exists (pass force = true / --force to replace it)", 2)
    end
    local okc, cfg = pcall(json.read_file, dir .. "/config.yaml")
    if not okc or type(cfg) ~= "table" or type(cfg.model) ~= "table" then
        error("checkpoint.export: " .. dir .. "/config.yaml does not hold the run's config", 2)
    end
    local mcfg = cfg.model
    local base = o.model or mcfg.pretrained_model_name_or_path
    if type(base) ~= "string" then error("checkpoint.export: the run's config names no model (pass model =)", 2) end
    local src = o.ema and dir .. "/ema" or dir
    if o.ema and not fs.isfile(src .. "/state.json") then
        error("checkpoint.export: " .. dir .. " has no EMA weights (ema/): the run had no ema block", 2)
    end
    local dtype = mcfg.torch_dtype
    if dtype ~= nil then dtype = require("nemo.train").dtype_name(dtype, "model.torch_dtype") end
    local stage = mcfg.stage ~= json.null and mcfg.stage or nil
    local pipeline = require "nemo.pipeline"
    local ok, pipe = pcall(function()
        if (mcfg.mode or "finetune") == "pretrain" then
            return pipeline.NeMoAutoDiffusionPipeline.from_config(base, mcfg.pipeline_spec,
                {torch_dtype = dtype or "bfloat16", device = "cpu", enable_gradient_checkpointing = false})
        end
        return pipeline.NeMoAutoDiffusionPipeline.from_pretrained(base, {torch_dtype = dtype or "bfloat16",
            device = "cpu", components_to_load = {"transformer"}, enable_gradient_checkpointing = false,
            active_transformer = stage and (stage == "low_noise" and "transformer_2" or "transformer") or nil})
    end)
    if not ok then error("checkpoint.export: the source pipeline " .. base .. ": " .. tostring(pipe), 2) end
    local model = pipe.transformer
    local adapter = o.ema and src or src .. "/model"
    local lok, lerr = pcall(function()
        if fs.isfile(adapter .. "/adapter_model.safetensors") then
            local peft = require "nemo.peft"
            peft.load_adapter(model, adapter)
            local n = peft.merge(model)
            log(string.format("merged the LoRA adapter of %s (%d layers) into %s's weights", adapter, n, base))
        else
            local weights = whole_weights(src)
            if not weights then error("no model/model.safetensors and no model shards in " .. src, 0) end
            model:load_state_dict(weights, {strict = true})
        end
    end)
    if not lok then error("checkpoint.export: " .. dir .. ": " .. tostring(lerr), 2) end
    local tmp = o.out .. ".export-tmp"
    if fs.exists(tmp) then fs.remove_tree(tmp) end
    pipe:save_pretrained(tmp)
    if fs.exists(o.out) then fs.remove_tree(o.out) end
    fs.rename(tmp, o.out)
    log(string.format("exported %s%s to %s (a diffusers pipeline folder)", dir, o.ema and " (the EMA weights)" or "",
        o.out))
    return o.out
end

return M
