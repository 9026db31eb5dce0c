-- lua/nemo/checkpoint.lua: training checkpoints.
--
-- <checkpoint_dir>/epoch_<E>_step_<S>/      (S = the 0-based index of the last step taken)
--   model/model.safetensors                  the trained module's state_dict
--   model/config.json                        the model config (the resume compatibility check)
--   optim/optim.safetensors + optim/state.json   optimizer moments, step counts, param groups, LR schedule
--   trainer.json                             step, epoch, RNG states, data-sampler position, metrics
--   config.yaml                              the resolved run config (JSON text, which YAML reads)
-- A checkpoint is written into "<name>.incomplete" and renamed when complete; LATEST (a one-line
-- file naming the newest checkpoint) is replaced atomically after that. Nothing half-written is
-- ever taken for a checkpoint.
local fs = require "nemo.fs"
local json = require "nemo.json"

local M = {}

local function st() return require "nemo.safetensors" end

local function write_text(path, text)
    local tmp = path .. ".tmp"
    local f, err = io.open(tmp, "wb")
    if not f then error("cannot write '" .. path .. "': " .. tostring(err), 3) end
    f:write(text)
    f:close()
    fs.rename(tmp, path)
end

function M.name(epoch, step) return string.format("epoch_%d_step_%d", epoch, step) end

-- save(root, {epoch=, step=, model=, optimizer=, scheduler=, trainer=, config=, model_config=})
-- returns the checkpoint folder.
function M.save(root, s)
    fs.mkdirs(root)
    local name = M.name(s.epoch, s.step)
    local final = root .. "/" .. name
    local tmp = final .. ".incomplete"
    if fs.exists(tmp) then fs.remove_tree(tmp) end
    fs.mkdirs(tmp .. "/model")
    fs.mkdirs(tmp .. "/optim")
    local ok, err = pcall(function()
        -- model
        local sd, keys = s.model:state_dict()
        local tensors = {}
        if keys then for _, k in ipairs(keys) do tensors[k] = sd[k] end else tensors = sd end
        st().save_file(tensors, tmp .. "/model/model.safetensors", {format = "pt"})
        if s.model_config then json.write_file(tmp .. "/model/config.json", s.model_config) end
        -- optimizer
        local osd = s.optimizer:state_dict()
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
        st().save_file(otensors, tmp .. "/optim/optim.safetensors", {format = "nemo"})
        ostate.scheduler = s.scheduler and s.scheduler:state_dict() or nil
        json.write_file(tmp .. "/optim/state.json", ostate)
        -- trainer state and config
        local trainer = s.trainer or {}
        trainer.epoch, trainer.step = s.epoch, s.step
        json.write_file(tmp .. "/trainer.json", trainer)
        write_text(tmp .. "/config.yaml", json.encode(s.config or {}, {indent = 2}) .. "\n")
    end)
    if not ok then
        pcall(fs.remove_tree, tmp)
        error("checkpoint: saving " .. final .. " failed: " .. tostring(err), 2)
    end
    if fs.exists(final) then fs.remove_tree(final) end
    fs.rename(tmp, final)
    fs.sync_dir(root)
    write_text(root .. "/LATEST", name .. "\n")
    fs.sync_dir(root)
    return final
end

-- The newest complete checkpoint under root: LATEST if it points at one, else the highest step.
function M.latest(root)
    if not fs.isdir(root) then return nil end
    if fs.isfile(root .. "/LATEST") then
        local name = fs.read(root .. "/LATEST"):gsub("%s+$", "")
        if name ~= "" and fs.isdir(root .. "/" .. name) then return root .. "/" .. name end
    end
    local best, best_step
    for _, n in ipairs(fs.list(root)) do
        local e, s = n:match("^epoch_(%d+)_step_(%d+)$")
        if s and fs.isdir(root .. "/" .. n) and (not best_step or tonumber(s) > best_step) then
            best, best_step = root .. "/" .. n, tonumber(s)
        end
        local _ = e
    end
    return best
end

-- resolve(restore_from, root): nil/"LATEST" -> newest under root (or nil), a name -> root/name,
-- a path -> itself. An explicit one that does not exist is an error.
function M.resolve(restore_from, root)
    if restore_from == nil or restore_from == json.null then return nil end
    if restore_from == "LATEST" or restore_from == "latest" then return M.latest(root) end
    if fs.isdir(restore_from) then return restore_from end
    if root and fs.isdir(root .. "/" .. restore_from) then return root .. "/" .. restore_from end
    error("checkpoint.restore_from: no checkpoint at '" .. tostring(restore_from) .. "'" ..
        (root and (" (nor under " .. root .. ")") or ""), 2)
end

-- The model config stored with a checkpoint (nil if none).
function M.model_config(dir)
    local p = dir .. "/model/config.json"
    if fs.isfile(p) then return json.read_file(p) end
    return nil
end

-- load(dir, {model=, optimizer=, scheduler=}) restores in place and returns trainer.json.
function M.load(dir, s)
    for _, f in ipairs { "/model/model.safetensors", "/optim/optim.safetensors", "/optim/state.json", "/trainer.json" } do
        if not fs.isfile(dir .. f) then error("checkpoint " .. dir .. " is incomplete: " .. f:sub(2) .. " is missing", 2) end
    end
    local weights = st().load_file(dir .. "/model/model.safetensors")
    local ok, err = pcall(s.model.load_state_dict, s.model, weights, {strict = true})
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
    return json.read_file(dir .. "/trainer.json")
end

return M
