-- lua/nemo/init.lua: the `nemo` module. require "nemo" loads libnemo, the Tensor, every op
-- family and the nn library, and exposes a PyTorch-like surface:
--   nemo.tensor, zeros, ones, empty, full, arange, linspace, rand, randn, manual_seed, Generator,
--   nemo.no_grad(fn), nemo.nn.functional (also nemo.F), nemo.nn, nemo.memory_stats(), ...
-- Functions of nemo.nn.functional are also reachable as nemo.<name> (nemo.exp, nemo.cat), as
-- torch.<name> is.
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"
local F = require "nemo.functional"

local C = nffi.C
local ffi = require "ffi"

local nemo = {}
nemo.version = ffi.string(C.nemo_version())
nemo.Tensor = Tensor
nemo.F = F

-- op families (each fills F and the tensor methods)
local families = {"pointwise", "shape", "reduce", "linalg", "nnops", "conv", "fused"}
for _, fam in ipairs(families) do
    local path = package.searchpath("nemo.ops." .. fam, package.path)
    if path then require("nemo.ops." .. fam) end
end

for _, k in ipairs { "tensor", "zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like",
                     "full_like", "arange", "linspace", "rand", "randn", "rand_like", "randn_like",
                     "manual_seed", "Generator", "is_tensor", "set_default_dtype", "get_default_dtype" } do
    nemo[k] = Tensor[k]
end
nemo.default_generator = Tensor.default_generator

nemo.no_grad = autograd.no_grad
nemo.enable_grad = autograd.enable_grad
nemo.is_grad_enabled = autograd.is_grad_enabled
nemo.set_grad_enabled = autograd.set_grad_enabled
nemo.autograd = autograd

-- dtype names as values: nemo.float32 == "float32" (so code can write dtype = nemo.bfloat16)
for name in pairs(Tensor.dtype_ids) do nemo[name] = name end
nemo.float, nemo.double, nemo.half, nemo.long = "float32", "float64", "float16", "int64"

function nemo.set_num_threads(n) nffi.check(C.nemo_set_num_threads(n)) end
function nemo.get_num_threads() return C.nemo_get_num_threads() end

-- Bytes held by live tensors on a device ("cpu" or "cuda:N"): current, peak and cached.
function nemo.memory_stats(device)
    local devtype, devindex = Tensor.parse_device(device or "cpu", "memory_stats")
    return {
        current = tonumber(C.nemo_memory_current(devtype, devindex)),
        peak = tonumber(C.nemo_memory_peak(devtype, devindex)),
        cached = tonumber(C.nemo_memory_cached(devtype, devindex)),
    }
end
function nemo.reset_peak_memory_stats(device)
    local devtype, devindex = Tensor.parse_device(device or "cpu", "reset_peak_memory_stats")
    C.nemo_memory_reset_peak(devtype, devindex)
end
function nemo.empty_cache(device)
    local devtype, devindex = Tensor.parse_device(device or "cpu", "empty_cache")
    C.nemo_memory_empty_cache(devtype, devindex)
end

-- optional parts, present as their modules land
local function optional(name)
    if package.searchpath(name, package.path) then return require(name) end
    return nil
end
nemo.cuda = optional "nemo.cuda"
nemo.dist = optional "nemo.dist"
nemo.parallel = optional "nemo.parallel"
nemo.optim = require "nemo.optim"
local st = optional "nemo.safetensors"
if st then
    nemo.safetensors = st
    nemo.load_file, nemo.safe_open, nemo.save_file = st.load_file, st.safe_open, st.save_file
end
nemo.yaml = require "nemo.yaml"
nemo.nn = optional "nemo.nn"
if nemo.nn then nemo.nn.functional = F else nemo.nn = {functional = F} end

-- torch-style top-level functions: nemo.exp(x), nemo.cat({a, b}, 0), ...
for k, v in pairs(F) do
    if type(v) == "function" and k:sub(1, 1) ~= "_" and nemo[k] == nil then nemo[k] = v end
end

-- the model, pipeline and training layers, loaded on first use (they require nemo themselves):
-- nemo.NeMoAutoDiffusionPipeline, nemo.PipelineSpec, nemo.pipeline, nemo.models,
-- nemo.FluxTransformer2DModel, nemo.WanTransformer3DModel, nemo.AutoencoderKL,
-- nemo.FlowMatchEulerDiscreteScheduler, nemo.UniPCMultistepScheduler, nemo.lr_scheduler, nemo.flow_matching,
-- nemo.data, nemo.torchfile (torch.save files), nemo.sampling (Flux and Wan pipelines' loops), nemo.generate (recipes/generate.lua), nemo.peft (LoRA),
-- nemo.tokenizers (CLIP, T5), nemo.image (PNG files), nemo.jpeg (JPEG decoding)
local LAZY = {
    NeMoAutoDiffusionPipeline = {"nemo.pipeline", "NeMoAutoDiffusionPipeline"},
    PipelineSpec = {"nemo.pipeline", "PipelineSpec"},
    pipeline = {"nemo.pipeline"},
    models = {"nemo.models"},
    FluxTransformer2DModel = {"nemo.models", "FluxTransformer2DModel"},
    WanTransformer3DModel = {"nemo.models", "WanTransformer3DModel"},
    AutoencoderKL = {"nemo.models", "AutoencoderKL"},
    FlowMatchEulerDiscreteScheduler = {"nemo.schedulers.flow_match_euler", "FlowMatchEulerDiscreteScheduler"},
    UniPCMultistepScheduler = {"nemo.schedulers.unipc", "UniPCMultistepScheduler"},
    lr_scheduler = {"nemo.lr_scheduler"},
    flow_matching = {"nemo.flow_matching"},
    data = {"nemo.data"},
    torchfile = {"nemo.torchfile"},
    sampling = {"nemo.sampling"},
    generate = {"nemo.generate"},
    peft = {"nemo.peft"},
    tokenizers = {"nemo.tokenizers"},
    image = {"nemo.image"},
    jpeg = {"nemo.jpeg"},
}
setmetatable(nemo, {__index = function(t, key)
    local where = LAZY[key]
    if not where then return nil end
    local mod = require(where[1])
    local v = where[2] and mod[where[2]] or mod
    rawset(t, key, v)
    return v
end})

return nemo
