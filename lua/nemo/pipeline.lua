-- lua/nemo/pipeline.lua: NeMoAutoDiffusionPipeline and PipelineSpec, the seed's API.
--
--   local pipe, managers = nemo.NeMoAutoDiffusionPipeline.from_pretrained("black-forest-labs/FLUX.1-dev",
--       {torch_dtype = "bfloat16", load_for_training = true})
--   local pipe = nemo.NeMoAutoDiffusionPipeline.from_config("black-forest-labs/FLUX.1-dev",
--       {transformer_cls = "FluxTransformer2DModel"}, {torch_dtype = "float32"})
--
-- A pipeline is a table of components. Components nemo-lua implements (the classes in the
-- nemo.models registry: the transformers, the AutoencoderKL and AutoencoderKLWan VAEs, the
-- CLIP / T5 / UMT5 text encoders) are loaded as modules, and the FlowMatchEulerDiscrete and
-- UniPCMultistep schedulers and the CLIP / T5 tokenizers (also in that registry; not modules:
-- no device, dtype or gradients) from their folders; the others are listed, skipped with a
-- warning, and carried through save_pretrained by copying their folders, so a saved pipeline is
-- still complete for diffusers. Components of the transformers library (text encoders,
-- tokenizers) are saved by copying the folder they were loaded from: nemo-lua does not train
-- them. parallel_scheme is handed to the parallel managers (lua/nemo/parallel: DDP and FSDP2).
-- active_transformer = "transformer" | "transformer_2" (Wan 2.2, as Automodel): the chosen
-- expert is loaded as `transformer` and the other slot is left empty.
local fs = require "nemo.fs"
local hub = require "nemo.hub"
local json = require "nemo.json"
local class = require "nemo.class"

local M = {}

local function warn(msg) io.stderr:write("nemo: warning: ", msg, "\n") end
M._warn = warn

-- ==== class registry ====

local function models() return require "nemo.models" end

-- Known pipeline classes and the transformer class each one carries.
M.PIPELINES = {
    FluxPipeline = {transformer = "FluxTransformer2DModel"},
    FluxImg2ImgPipeline = {transformer = "FluxTransformer2DModel"},
    FluxInpaintPipeline = {transformer = "FluxTransformer2DModel"},
    WanPipeline = {transformer = "WanTransformer3DModel"},
    WanImageToVideoPipeline = {transformer = "WanTransformer3DModel"},
}

-- _import_diffusers_class(name): the model class implementing a diffusers class name.
function M._import_diffusers_class(name)
    if type(name) ~= "string" or name == "" then
        error("_import_diffusers_class: expected a class name string, got " .. tostring(name), 2)
    end
    local ok, reg = pcall(models)
    local cls = ok and reg.registry and reg.registry[name] or nil
    if cls then return cls end
    local known = {}
    if ok and reg.registry then for k in pairs(reg.registry) do known[#known + 1] = k end end
    table.sort(known)
    error(string.format("unknown model class '%s'; known classes: %s", name,
        #known > 0 and table.concat(known, ", ") or "(none)"), 2)
end

local function implemented(name)
    local ok, reg = pcall(models)
    return ok and reg.registry and reg.registry[name] ~= nil
end

-- ==== PipelineSpec ====

local PipelineSpec = {}
PipelineSpec.__index = PipelineSpec
M.PipelineSpec = PipelineSpec

local SPEC_FIELDS = {
    transformer_cls = {type = "string"},
    pipeline_cls = {type = "string"},
    subfolder = {type = "string", default = "transformer"},
    load_full_pipeline = {type = "boolean", default = false},
    enable_gradient_checkpointing = {type = "boolean", default = true},
    low_cpu_mem_usage = {type = "boolean", default = true},
}
PipelineSpec.FIELDS = SPEC_FIELDS

-- PipelineSpec.from_dict(d): nil gives the defaults; an unknown key or a wrong type is an
-- error naming the key (a typo is never silently ignored).
function PipelineSpec.from_dict(d)
    if d ~= nil and type(d) ~= "table" then error("PipelineSpec.from_dict: expected a table, got " .. type(d), 2) end
    if getmetatable(d) == PipelineSpec then return d end
    local spec = setmetatable({}, PipelineSpec)
    for k, f in pairs(SPEC_FIELDS) do spec[k] = f.default end
    for k, v in pairs(d or {}) do
        local f = SPEC_FIELDS[k]
        if not f then
            local names = {}
            for n in pairs(SPEC_FIELDS) do names[#names + 1] = n end
            table.sort(names)
            error(string.format("PipelineSpec: unknown key '%s' (known keys: %s)", tostring(k), table.concat(names, ", ")), 2)
        end
        if v == json.null then v = nil end
        if v ~= nil and type(v) ~= f.type then
            error(string.format("PipelineSpec: '%s' must be a %s, got %s (%s)", k, f.type, type(v), tostring(v)), 2)
        end
        if v ~= nil then spec[k] = v end
    end
    return spec
end

function PipelineSpec:validate_for_from_config()
    if self.transformer_cls == nil or self.transformer_cls == "" then
        error("PipelineSpec: transformer_cls is required for from_config (pretraining). In YAML:\n" ..
              "  model:\n    mode: pretrain\n    pipeline_spec:\n      transformer_cls: FluxTransformer2DModel\n" ..
              "      subfolder: transformer", 2)
    end
    return self
end

function PipelineSpec:to_dict()
    local d = {}
    for k in pairs(SPEC_FIELDS) do d[k] = self[k] end
    return d
end

-- ==== helpers of the seed ====

-- cuda:LOCAL_RANK when CUDA is present, else cpu.
function M._choose_device()
    local ok, cuda = pcall(require, "nemo.cuda")
    if ok and cuda and cuda.is_available() then
        return "cuda:" .. (tonumber(os.getenv("LOCAL_RANK") or "0") or 0)
    end
    return "cpu"
end

local function is_module(v)
    local nn = require "nemo.nn"
    return type(v) == "table" and nn.Module ~= nil and class.isinstance(v, nn.Module)
end

-- Iterate (name, module) over the pipeline's loaded modules, in component order.
function M._iter_pipeline_modules(pipe)
    local names = {}
    for _, name in ipairs(pipe.component_names or {}) do
        if is_module(pipe.components[name]) then names[#names + 1] = name end
    end
    local i = 0
    return function()
        i = i + 1
        local n = names[i]
        if n then return n, pipe.components[n] end
    end
end

function M._move_module_to_device(module, device, dtype)
    local opts = {device = device}
    if dtype and dtype ~= "auto" then opts.dtype = dtype end
    module:to(opts)
    return module
end

-- Make every parameter trainable; returns how many parameters (tensors) that is.
function M._ensure_params_trainable(module)
    local n = 0
    for _, p in module:named_parameters() do
        p:requires_grad_(true)
        n = n + 1
    end
    return n
end

local function check_dtype(d, what)
    if d == nil or d == "auto" then return d end
    d = (tostring(d):gsub("^torch%.", ""))
    require("nemo.tensor").dtype_id(d, what)   -- raises, naming the accepted values
    return d
end

-- parallel_scheme: component name -> manager options ({_manager_type = "ddp"|"fsdp2", ...}).
-- Every entry is checked (and its manager built) before anything is loaded.
local function check_parallel_scheme(scheme)
    if scheme == nil or scheme == json.null then return {} end
    if type(scheme) ~= "table" then error("parallel_scheme: expected a table of component -> manager options", 3) end
    if next(scheme) == nil then return {} end
    local parallel = require "nemo.parallel"
    for name, args in pairs(scheme) do
        if type(args) ~= "table" then
            error(string.format("parallel_scheme.%s: expected a table of manager options, got %s", tostring(name), type(args)), 3)
        end
        local ok, err = pcall(parallel._create_parallel_manager, args)
        if not ok then error("parallel_scheme." .. tostring(name) .. ": " .. tostring(err), 3) end
    end
    return scheme
end

-- ==== the pipeline object ====

local Pipeline = {}
Pipeline.__index = function(self, k)
    local m = Pipeline[k]
    if m ~= nil then return m end
    local comps = rawget(self, "components")
    return comps and comps[k]
end
M.NeMoAutoDiffusionPipeline = Pipeline

local DIFFUSERS_VERSION = "0.36.0"

local function new_pipeline(fields)
    return setmetatable(fields, Pipeline)
end

function Pipeline:__tostring()
    local lines = {string.format("NeMoAutoDiffusionPipeline(%s)", self.class_name or "?")}
    for _, name in ipairs(self.component_names) do
        local c = self.components[name]
        local desc
        if is_module(c) then desc = (tostring(c.__name or "module"):match("([^%.]+)$"))
        elseif self.skipped[name] then desc = table.concat(self.skipped[name].spec, ".") .. " (not loaded)"
        else desc = tostring(c) end
        lines[#lines + 1] = "  " .. name .. ": " .. desc
    end
    return table.concat(lines, "\n")
end

local function read_model_index(root)
    local path = root .. "/model_index.json"
    if not fs.isfile(path) then
        local hint = fs.isfile(root .. "/config.json") and
            " (it holds a config.json: it is a single model folder; load it with the model class's from_pretrained)" or ""
        error(string.format("from_pretrained: no model_index.json in '%s'%s", root, hint), 3)
    end
    local idx = json.read_file(path)
    if type(idx) ~= "table" or type(idx._class_name) ~= "string" then
        error(string.format("from_pretrained: %s has no _class_name string", path), 3)
    end
    return idx, path
end

-- NeMoAutoDiffusionPipeline.from_pretrained(path_or_id, opts) -> pipe, managers
function Pipeline.from_pretrained(path_or_id, opts)
    opts = opts or {}
    local known = {parallel_scheme = 1, device = 1, torch_dtype = 1, move_to_device = 1, load_for_training = 1,
                   components_to_load = 1, enable_gradient_checkpointing = 1, low_cpu_mem_usage = 1,
                   transformer = 1, revision = 1, active_transformer = 1}
    for k in pairs(opts) do
        if not known[k] then error("from_pretrained: unknown option '" .. tostring(k) .. "'", 2) end
    end
    local scheme = check_parallel_scheme(opts.parallel_scheme)
    local root = hub.resolve(path_or_id, {revision = opts.revision})
    local idx, idx_path = read_model_index(root)
    local folders = {}   -- component -> its folder, when not root/<component>
    local active = opts.active_transformer
    if active ~= nil then
        -- Wan 2.2: train one expert. The chosen one becomes `transformer`, the other slot none.
        if active ~= "transformer" and active ~= "transformer_2" then
            error("from_pretrained: active_transformer must be \"transformer\" or \"transformer_2\", got " .. tostring(active), 2)
        end
        local spec = idx[active]
        if type(spec) ~= "table" or spec[2] == nil or spec[2] == json.null then
            error(string.format("from_pretrained: active_transformer is '%s' but %s lists no %s%s", active, idx_path, active,
                active == "transformer_2" and " (not a Wan 2.2 two-expert pipeline)" or ""), 2)
        end
        local copy = {}
        for k, v in pairs(idx) do copy[k] = v end
        copy.transformer = spec
        if idx.transformer_2 ~= nil then copy.transformer_2 = {json.null, json.null} end
        folders.transformer = root .. "/" .. active
        active = {name = active, index = idx, root = root}
        idx = copy
    end
    local function folder_of(name) return folders[name] or (root .. "/" .. name) end
    local torch_dtype = check_dtype(opts.torch_dtype == nil and "bfloat16" or opts.torch_dtype, "from_pretrained torch_dtype")
    local device = opts.device or M._choose_device()
    local move = opts.move_to_device ~= false
    local ckpt = opts.enable_gradient_checkpointing ~= false
    local want
    if opts.components_to_load ~= nil then
        if type(opts.components_to_load) ~= "table" then error("from_pretrained: components_to_load must be a list of names", 2) end
        want = {}
        for _, n in ipairs(opts.components_to_load) do
            if idx[n] == nil then
                error(string.format("from_pretrained: components_to_load names '%s', which %s does not list", n, idx_path), 2)
            end
            want[n] = true
        end
    end
    local names = {}
    for k, v in pairs(idx) do
        if k:sub(1, 1) ~= "_" and type(v) == "table" and #v == 2 then names[#names + 1] = k end
    end
    table.sort(names)
    local pipe = new_pipeline({class_name = idx._class_name, root = root, config = idx, components = {},
                               component_names = names, skipped = {}, managers = {}, sources = {}})
    local skipped_names = {}
    for _, name in ipairs(names) do
        local lib, cls = idx[name][1], idx[name][2]
        if lib == json.null or cls == json.null then
            pipe.components[name] = nil
        elseif want == nil and lib == "transformers" and implemented(cls) and not fs.isdir(folder_of(name)) then
            -- a text encoder or tokenizer left out of the folder (training needs neither)
            pipe.skipped[name] = {spec = {lib, cls}, folder = folder_of(name)}
            warn(string.format("from_pretrained: %s lists %s (%s) but the folder %s is missing; not loaded",
                idx_path, name, cls, folder_of(name)))
        elseif (want == nil or want[name]) and implemented(cls) then
            local folder = folder_of(name)
            if not fs.isdir(folder) then
                error(string.format("from_pretrained: %s lists component '%s' (%s) but the folder %s is missing",
                    idx_path, name, cls, folder), 2)
            end
            local Cls = M._import_diffusers_class(cls)
            local model
            if name == "transformer" and opts.transformer then model = opts.transformer
            else model = Cls.from_pretrained(folder, {torch_dtype = torch_dtype ~= "auto" and torch_dtype or nil}) end
            -- the dtype was applied while loading (keeping a model's float32-only modules, as
            -- diffusers does); only the device moves here
            if is_module(model) then   -- not the scheduler
                if move then M._move_module_to_device(model, device, nil) end
                if opts.load_for_training then M._ensure_params_trainable(model)
                else model:requires_grad_(false) end
                if ckpt and model.enable_gradient_checkpointing then model:enable_gradient_checkpointing() end
            end
            pipe.components[name] = model
            pipe.sources[name] = folder
        else
            if want and want[name] then
                error(string.format("from_pretrained: component '%s' (%s.%s) was asked for in components_to_load, " ..
                    "but nemo-lua has no implementation of %s yet", name, tostring(lib), tostring(cls), tostring(cls)), 2)
            end
            pipe.skipped[name] = {spec = {lib, cls}, folder = folder_of(name)}
            if want == nil then skipped_names[#skipped_names + 1] = name .. " (" .. tostring(cls) .. ")" end
        end
    end
    if #skipped_names > 0 then
        warn("from_pretrained: not loaded (no nemo-lua implementation yet): " .. table.concat(skipped_names, ", "))
    end
    pipe.transformer = pipe.components.transformer
    if type(active) == "table" then pipe.active_transformer = active end
    pipe.managers = M._apply_parallelization(pipe, scheme)
    return pipe, pipe.managers
end

function M._apply_parallelization(pipe, scheme)
    if scheme == nil or next(scheme) == nil then return {} end
    return require("nemo.parallel")._apply_parallelization(pipe, scheme)
end

-- Read <model_id>/<subfolder>/config.json from a folder, the HF cache, or the shipped configs.
local function read_component_config(model_id, subfolder)
    local root, shipped = hub.resolve(model_id, {shipped = true})
    local path = subfolder and subfolder ~= "" and (root .. "/" .. subfolder .. "/config.json") or (root .. "/config.json")
    if not fs.isfile(path) then
        error(string.format("from_config: no config.json at %s%s", path,
            shipped and " (shipped configs cover the transformer subfolder only)" or ""), 3)
    end
    return json.read_file(path), root, path
end
M._read_component_config = read_component_config

-- NeMoAutoDiffusionPipeline.from_config(model_id, pipeline_spec, opts) -> pipe, managers
-- Random weights (diffusers' default init, from nemo's default generator: seed it first).
function Pipeline.from_config(model_id, pipeline_spec, opts)
    opts = opts or {}
    local known = {parallel_scheme = 1, device = 1, torch_dtype = 1, move_to_device = 1, components_to_load = 1,
                   enable_gradient_checkpointing = 1}
    for k in pairs(opts) do
        if not known[k] then error("from_config: unknown option '" .. tostring(k) .. "'", 2) end
    end
    local spec = PipelineSpec.from_dict(pipeline_spec):validate_for_from_config()
    local scheme = check_parallel_scheme(opts.parallel_scheme)
    local cfg, root, path = read_component_config(model_id, spec.subfolder)
    local Cls = M._import_diffusers_class(spec.transformer_cls)
    if not (type(Cls) == "table" and tostring(Cls.__name):find("Transformer", 1, true)) then
        error(string.format("from_config: transformer_cls '%s' is not a transformer model (FluxTransformer2DModel, " ..
            "WanTransformer3DModel)", tostring(spec.transformer_cls)), 2)
    end
    if type(cfg._class_name) == "string" and cfg._class_name ~= spec.transformer_cls then
        warn(string.format("from_config: %s describes a %s, building it as %s", path, cfg._class_name, spec.transformer_cls))
    end
    local model = Cls(cfg)
    local torch_dtype = check_dtype(opts.torch_dtype == nil and "bfloat16" or opts.torch_dtype, "from_config torch_dtype")
    local device = opts.device or M._choose_device()
    if opts.move_to_device ~= false then M._move_module_to_device(model, device, torch_dtype)
    elseif torch_dtype ~= "auto" then model:to{dtype = torch_dtype} end
    M._ensure_params_trainable(model)
    local ckpt = opts.enable_gradient_checkpointing
    if ckpt == nil then ckpt = spec.enable_gradient_checkpointing end
    if ckpt and model.enable_gradient_checkpointing then model:enable_gradient_checkpointing() end
    local pipe
    if spec.load_full_pipeline and spec.pipeline_cls then
        pipe = Pipeline.from_pretrained(model_id, {transformer = model, torch_dtype = torch_dtype, device = device,
            move_to_device = opts.move_to_device, components_to_load = opts.components_to_load, load_for_training = true,
            enable_gradient_checkpointing = ckpt})
        pipe.components.transformer = model
        pipe.transformer = model
    else
        local pipeline_cls = spec.pipeline_cls
        if not pipeline_cls then
            for pname, p in pairs(M.PIPELINES) do
                if p.transformer == spec.transformer_cls and (pname == "FluxPipeline" or pname == "WanPipeline") then pipeline_cls = pname end
            end
        end
        pipe = new_pipeline({class_name = pipeline_cls or "DiffusionPipeline", root = root, components = {transformer = model},
                             component_names = {"transformer"}, skipped = {}, transformer = model,
                             config = {_class_name = pipeline_cls or "DiffusionPipeline"}})
    end
    pipe.spec = spec
    pipe.managers = M._apply_parallelization(pipe, scheme)
    return pipe, pipe.managers
end

-- pipe:save_pretrained(dir, {max_shard_size=}): model_index.json plus one folder per component
-- in the layout diffusers loads. Components nemo-lua did not load are copied from their source.
-- Written into a temporary folder and renamed into place, so a failure leaves nothing half done.
function Pipeline:save_pretrained(dir, opts)
    opts = opts or {}
    if type(dir) ~= "string" or dir == "" then error("save_pretrained: expected a folder path", 2) end
    local tmp = dir .. ".tmp-" .. tostring(os.time()) .. "-" .. tostring(math.random(1e9))
    fs.mkdirs(tmp)
    local ok, err = pcall(function()
        local index = {_class_name = self.class_name, _diffusers_version = DIFFUSERS_VERSION}
        for k, v in pairs(self.config or {}) do
            if k:sub(1, 1) ~= "_" and type(v) ~= "table" then index[k] = v end
        end
        for _, name in ipairs(self.component_names) do
            local c = self.components[name]
            local skipped = self.skipped[name]
            local spec = self.config and self.config[name]
            local src = self.sources and self.sources[name]
            if c ~= nil and type(spec) == "table" and spec[1] == "transformers" and src and fs.isdir(src) then
                index[name] = spec   -- a text encoder or tokenizer: its folder as loaded
                fs.copy_tree(src, tmp .. "/" .. name)
            elseif is_module(c) then
                index[name] = {"diffusers", (tostring(c.__name or "?"):match("([^%.]+)$"))}
                c:save_pretrained(tmp .. "/" .. name, {max_shard_size = opts.max_shard_size})
            elseif type(c) == "table" and type(c.save_pretrained) == "function" and c.__name then
                -- a loaded component that is not a module (the scheduler) writes its own config
                index[name] = {"diffusers", (tostring(c.__name):match("([^%.]+)$"))}
                c:save_pretrained(tmp .. "/" .. name)
            elseif skipped then
                index[name] = skipped.spec
                if fs.isdir(skipped.folder) then fs.copy_tree(skipped.folder, tmp .. "/" .. name) end
            elseif self.config and self.config[name] then
                index[name] = self.config[name]
            end
        end
        local act = self.active_transformer
        if act and type(act.index.transformer_2) == "table" and act.index.transformer_2[2] ~= json.null then
            -- one Wan 2.2 expert was loaded: it goes back to its own slot, the other expert is
            -- copied from the source, so the saved folder is the whole two-expert pipeline
            local other = act.name == "transformer" and "transformer_2" or "transformer"
            if act.name == "transformer_2" and fs.isdir(tmp .. "/transformer") then
                fs.rename(tmp .. "/transformer", tmp .. "/transformer_2")
                index.transformer_2 = index.transformer
            end
            if fs.isdir(act.root .. "/" .. other) then
                fs.copy_tree(act.root .. "/" .. other, tmp .. "/" .. other)
                index[other] = act.index[other]
            else
                index[other] = {json.null, json.null}
                warn(string.format("save_pretrained: the other expert's folder %s/%s is gone; %s saved without it",
                    act.root, other, dir))
            end
        end
        json.write_file(tmp .. "/model_index.json", index, {indent = 2})
    end)
    if not ok then
        pcall(fs.remove_tree, tmp)
        error("save_pretrained: " .. tostring(err), 2)
    end
    if fs.exists(dir) then
        local old = dir .. ".old-" .. tostring(os.time())
        fs.rename(dir, old)
        local rok, rerr = pcall(fs.rename, tmp, dir)
        if not rok then fs.rename(old, dir); pcall(fs.remove_tree, tmp); error(rerr, 2) end
        fs.remove_tree(old)
    else
        fs.rename(tmp, dir)
    end
    return dir
end

return M
