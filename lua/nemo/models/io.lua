-- lua/nemo/models/io.lua: reading and writing diffusers model folders, shared by the model
-- classes: config.json, and the weights as one diffusion_pytorch_model.safetensors or as shards
-- named by diffusion_pytorch_model.safetensors.index.json (weight_map -> file). Errors name the file.
local nemo = require "nemo"
local json = require "nemo.json"
local fs = require "nemo.fs"

local M = {}
local null = json.null

M.WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
M.WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

local function describe(v)
    if type(v) == "string" then return string.format("string %q", v) end
    if v == null then return "null" end
    if type(v) == "table" then
        local s = {}
        for i, x in ipairs(v) do s[i] = describe(x) end
        return "{" .. table.concat(s, ", ") .. "}"
    end
    return type(v) .. " " .. tostring(v)
end
M.describe = describe

-- read_json(path, who, what): a JSON object from a file; errors name who, what and the path.
function M.read_json(path, who, what)
    local f, err = io.open(path, "rb")
    if not f then error(string.format("%s: cannot read %s '%s': %s", who, what, path, tostring(err)), 3) end
    local text = f:read("*a")
    f:close()
    local ok, v = pcall(json.decode, text, path)
    if not ok then error(string.format("%s: %s '%s' is not valid JSON: %s", who, what, path, tostring(v)), 3) end
    if type(v) ~= "table" then
        error(string.format("%s: %s '%s' must hold a JSON object, got %s", who, what, path, describe(v)), 3)
    end
    return v
end

-- transformers' names for the same files (text encoders)
M.TRANSFORMERS_WEIGHTS = {"model.safetensors", "model.safetensors.index.json"}

-- read_weights(folder, who, device, names) -> name -> tensor (memory-mapped), single file or
-- sharded. names: {single file, index file} (default diffusers' names).
function M.read_weights(folder, who, device, names)
    local wname, iname = M.WEIGHTS_NAME, M.WEIGHTS_INDEX_NAME
    if names then wname, iname = names[1], names[2] end
    local single = folder .. "/" .. wname
    local index = folder .. "/" .. iname
    local lopts = device and {device = device} or nil
    if fs.exists(single) then return nemo.load_file(single, lopts) end
    if not fs.exists(index) then
        error(string.format("%s: '%s' has neither %s nor %s", who, folder, wname, iname), 3)
    end
    local idx = M.read_json(index, who, "weight index")
    if type(idx.weight_map) ~= "table" then
        error(string.format("%s: weight index '%s' has no weight_map object", who, index), 3)
    end
    local files, order = {}, {}
    for name, file in pairs(idx.weight_map) do
        if type(file) ~= "string" then
            error(string.format("%s: weight index '%s': weight_map[%s] must be a file name, got %s", who, index,
                name, describe(file)), 3)
        end
        if not files[file] then files[file] = {}; order[#order + 1] = file end
        files[file][#files[file] + 1] = name
    end
    table.sort(order)
    local sd = {}
    for _, file in ipairs(order) do
        local path = folder .. "/" .. file
        if not fs.exists(path) then
            error(string.format("%s: shard '%s' named by '%s' does not exist", who, path, index), 3)
        end
        local part = nemo.load_file(path, lopts)
        for _, name in ipairs(files[file]) do
            if part[name] == nil then
                error(string.format("%s: shard '%s' has no tensor '%s' (weight_map in '%s' says it has)", who, path,
                    name, index), 3)
            end
            sd[name] = part[name]
        end
        for name, t in pairs(part) do if sd[name] == nil then sd[name] = t end end
    end
    return sd
end

-- "10GB" (10^9), "5GiB" (2^30), "500MB", "100KB", "42" or a number of bytes.
function M.parse_size(s)
    if type(s) == "number" then return s end
    if type(s) ~= "string" then error("save_pretrained: max_shard_size must be a number or a string like '10GB'", 4) end
    local num, unit = s:upper():match("^%s*([%d%.]+)%s*(%a*)%s*$")
    local units = {[""] = 1, B = 1, KB = 1e3, MB = 1e6, GB = 1e9, TB = 1e12, KIB = 2^10, MIB = 2^20, GIB = 2^30, TIB = 2^40}
    if not num or not units[unit] then
        error("save_pretrained: cannot read max_shard_size '" .. s .. "' (expected e.g. '10GB', '500MB' or bytes)", 4)
    end
    return math.floor(tonumber(num) * units[unit])
end

-- load_folder(folder, opts, spec) -> model: what a class's from_pretrained does with a diffusers
-- model folder (opts: torch_dtype | dtype = "float32", device, subfolder). spec: {class_name,
-- build = fn(cfg, dtype) -> model (layers' random init skipped by the caller), ignore = {key
-- substrings dropped from the file}, dtype_of = fn(key, dtype) -> the dtype a tensor keeps,
-- weights = {single file, index file} names (default diffusers'; M.TRANSFORMERS_WEIGHTS for a
-- transformers folder), remap = fn(sd) -> sd (e.g. tied embeddings) before the strict load}.
-- Reads config.json (a warning when another class saved it) and the weights (single file or
-- shards), and loads them strictly (every key present, none unexpected, shapes equal). Tensors
-- already in their dtype are taken as they are (assign: the parameters share the memory-mapped
-- file, no second copy); the others are converted once.
function M.load_folder(folder, opts, spec)
    local who = spec.class_name .. ".from_pretrained"
    if type(folder) ~= "string" then error(who .. ": folder must be a string, got " .. type(folder), 3) end
    opts = opts or {}
    if opts.subfolder then folder = folder .. "/" .. opts.subfolder end
    local cfg_path = folder .. "/config.json"
    if not fs.exists(cfg_path) then
        error(string.format("%s: missing config file '%s' (is '%s' a diffusers model folder?)", who, cfg_path,
            folder), 3)
    end
    local cfg = M.read_json(cfg_path, who, "config file")
    local cls_name = cfg._class_name
    if cls_name ~= nil and cls_name ~= spec.class_name then
        io.stderr:write(string.format("warning: %s: '%s' was saved from %s, not %s\n", who, cfg_path,
            tostring(cls_name), spec.class_name))
    end
    local Tensor = require "nemo.tensor"
    local dtype = opts.torch_dtype or opts.dtype or "float32"
    dtype = Tensor.dtype_names[Tensor.dtype_id(dtype, who .. " torch_dtype")]
    local ok, model = pcall(spec.build, cfg, dtype)
    if not ok then error(string.format("%s('%s'): %s", who, cfg_path, tostring(model)), 3) end
    local device = opts.device
    if device == "cpu" then device = nil end
    local sd = M.read_weights(folder, who, device, spec.weights)
    if spec.remap then sd = spec.remap(sd) end
    for k in pairs(sd) do
        for _, pat in ipairs(spec.ignore or {}) do
            if k:find(pat, 1, true) then sd[k] = nil end
        end
    end
    for k, t in pairs(sd) do
        if Tensor.is_tensor(t) and t:is_floating_point() then
            local want = spec.dtype_of and spec.dtype_of(k, dtype) or dtype
            if t.dtype ~= want then sd[k] = t:to{dtype = want} end
        end
    end
    local lok, err = pcall(model.load_state_dict, model, sd, {strict = true, assign = true})
    if not lok then error(string.format("%s('%s'): %s", who, folder, tostring(err)), 3) end
    if device then model:to{device = device} end
    return model
end

-- write_folder(model, folder, cfg, {max_shard_size = "10GB"}, who): config.json (cfg, already
-- holding _class_name and _diffusers_version) and the model's state_dict as one
-- diffusion_pytorch_model.safetensors, or as shards diffusion_pytorch_model-0000i-of-0000n plus
-- the index when they exceed max_shard_size (split greedily in state_dict order, as
-- huggingface_hub does). Weight files of an earlier save that this one does not write are removed.
function M.write_folder(model, folder, cfg, opts, who)
    if type(folder) ~= "string" then error(who .. ": folder must be a string, got " .. type(folder), 3) end
    opts = opts or {}
    local max_size = M.parse_size(opts.max_shard_size or "10GB")
    -- a tensor-parallel model holds slices of its split layers: they are gathered first (the FSDP2
    -- manager's summon_full_params swaps the whole tensors in), never written as the weights
    for name, p in model:named_parameters() do
        local info = rawget(p, "_tp")
        if info and table.concat(p.shape, "x") ~= table.concat(info.shape, "x") then
            error(string.format("%s: the model is tensor-parallel: %s holds this rank's slice (%s of %s); save it " ..
                "inside the FSDP2 manager's summon_full_params (every rank calls it; it gathers the slices), or " ..
                "write full_state_dict()", who, name, table.concat(p.shape, "x"), table.concat(info.shape, "x")), 3)
        end
    end
    fs.mkdirs(folder)
    json.write_file(folder .. "/config.json", cfg, {indent = 2})
    local sd, keys = model:state_dict()
    local shards, cur, cur_size, total = {}, nil, 0, 0
    for _, k in ipairs(keys) do
        local t = sd[k]
        if t.device ~= "cpu" then t = t:to{device = "cpu"} end
        local size = t:numel() * t:element_size()
        total = total + size
        if cur == nil or (cur_size + size > max_size and cur_size > 0) then
            cur = {tensors = {}, names = {}}
            shards[#shards + 1] = cur
            cur_size = 0
        end
        cur.tensors[k] = t
        cur.names[#cur.names + 1] = k
        cur_size = cur_size + size
    end
    if #shards == 0 then shards[1] = {tensors = {}, names = {}} end
    local written = {}
    local meta = {format = "pt"}
    if #shards == 1 then
        nemo.save_file(shards[1].tensors, folder .. "/" .. M.WEIGHTS_NAME, meta)
        written[M.WEIGHTS_NAME] = true
    else
        local weight_map = {}
        for i, sh in ipairs(shards) do
            local name = string.format("diffusion_pytorch_model-%05d-of-%05d.safetensors", i, #shards)
            nemo.save_file(sh.tensors, folder .. "/" .. name, meta)
            written[name] = true
            for _, k in ipairs(sh.names) do weight_map[k] = name end
        end
        json.write_file(folder .. "/" .. M.WEIGHTS_INDEX_NAME,
            {metadata = {total_size = total}, weight_map = weight_map}, {indent = 2})
        written[M.WEIGHTS_INDEX_NAME] = true
    end
    for _, name in ipairs(fs.list(folder)) do   -- stale weight files of an earlier save
        if not written[name] and (name == M.WEIGHTS_NAME or name == M.WEIGHTS_INDEX_NAME or
                name:match("^diffusion_pytorch_model%-%d+%-of%-%d+%.safetensors$")) then
            os.remove(folder .. "/" .. name)
        end
    end
    return folder
end

return M
