-- lua/nemo/models/init.lua: the model registry (require "nemo.models").
--   local models = require "nemo.models"
--   local Flux = models.FluxTransformer2DModel          -- the class
--   local cls = models.get("FluxTransformer2DModel")    -- same; an unknown name is an error that
--                                                        -- lists the known ones
--   models.registry                                     -- name -> class, every implemented model
--                                                        -- (and the non-module pipeline components
--                                                        -- nemo-lua implements: the scheduler)
-- `known` maps each diffusers class name to the module defining it (the module returns a table
-- holding the class under that name). Requiring this file loads every known module that is
-- installed; one that fails to load does not hide the others: get(name) raises its error.
local M = {}

local known = {
    FluxTransformer2DModel = "nemo.models.flux",
    WanTransformer3DModel = "nemo.models.wan",
    AutoencoderKL = "nemo.models.vae",
    AutoencoderKLWan = "nemo.models.wan_vae",
    -- the text encoders (transformers' classes and folders)
    CLIPTextModel = "nemo.models.clip",
    CLIPVisionModel = "nemo.models.clip",   -- Wan 2.1 I2V's image_encoder
    T5EncoderModel = "nemo.models.t5",
    UMT5EncoderModel = "nemo.models.t5",
    -- not models (no weights, no nn.Module): the pipeline loads them from their folders
    FlowMatchEulerDiscreteScheduler = "nemo.schedulers.flow_match_euler",
    UniPCMultistepScheduler = "nemo.schedulers.unipc",
    CLIPImageProcessor = "nemo.models.clip",   -- Wan 2.1 I2V's image_processor
    CLIPTokenizer = "nemo.tokenizers",
    CLIPTokenizerFast = "nemo.tokenizers",
    T5Tokenizer = "nemo.tokenizers",
    T5TokenizerFast = "nemo.tokenizers",
}
M.known = known
-- the order error messages list the names in: the transformers, then the other components,
-- then what register() adds
local order = {"FluxTransformer2DModel", "WanTransformer3DModel", "AutoencoderKL", "AutoencoderKLWan", "CLIPTextModel",
               "CLIPVisionModel", "T5EncoderModel",
               "UMT5EncoderModel", "FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler", "CLIPImageProcessor",
               "CLIPTokenizer", "CLIPTokenizerFast",
               "T5Tokenizer", "T5TokenizerFast"}
M.registry = {}
local load_errors = {}

local function load(name)
    local path = known[name]
    if not package.searchpath(path, package.path) then return nil end
    local ok, mod = pcall(require, path)
    if not ok then
        load_errors[name] = mod
        return nil
    end
    local cls = type(mod) == "table" and mod[name] or nil
    if cls == nil then
        load_errors[name] = string.format("module '%s' does not define '%s'", path, name)
        return nil
    end
    M.registry[name] = cls
    rawset(M, name, cls)
    return cls
end

local function names()
    local out, seen = {}, {}
    for _, k in ipairs(order) do
        if known[k] ~= nil and not seen[k] then out[#out + 1] = k; seen[k] = true end
    end
    local rest = {}
    for k in pairs(known) do if not seen[k] then rest[#rest + 1] = k end end
    table.sort(rest)
    for _, k in ipairs(rest) do out[#out + 1] = k end
    return table.concat(out, ", ")
end

-- register(name, module_path): add a model class (its module returns {[name] = class, ...}).
function M.register(name, module_path)
    if type(name) ~= "string" or type(module_path) ~= "string" then
        error("models.register: expected (name, module_path) strings", 2)
    end
    if known[name] == nil then order[#order + 1] = name end
    known[name] = module_path
    load_errors[name] = nil
    M.registry[name] = nil
    rawset(M, name, nil)
    return load(name)
end

-- get(name) -> the model class
function M.get(name)
    local path = known[name]
    if path == nil then
        error(string.format("models.get: unknown model class '%s' (known: %s)", tostring(name), names()), 2)
    end
    local cls = M.registry[name] or load(name)
    if cls then return cls end
    if load_errors[name] then
        error(string.format("models.get: model class '%s' failed to load from '%s': %s", name, path,
            tostring(load_errors[name])), 2)
    end
    error(string.format("models.get: model class '%s' is known but its module '%s' is not installed", name, path), 2)
end

for name in pairs(known) do load(name) end

setmetatable(M, {__index = function(_, k)
    if type(k) == "string" and known[k] ~= nil then return M.get(k) end
    return nil
end})

return M
