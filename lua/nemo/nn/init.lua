-- lua/nemo/nn/init.lua: the nn table (torch.nn in Lua): Module, Parameter, the containers
-- (ModuleList, Sequential), the layers (Linear, LayerNorm, RMSNorm, GroupNorm, Conv2d, Conv3d,
-- Embedding, Dropout, GELU, SiLU, ReLU, Tanh, Sigmoid, Identity) and nn.init (initialisers).
-- nemo.nn.functional is set by lua/nemo/init.lua. The layers call F.* at forward time, so
-- require "nemo" (which loads every op family) before running them. See docs/nn.md.
local Module = require "nemo.nn.module"
local containers = require "nemo.nn.containers"
local layers = require "nemo.nn.layers"

local nn = {
    Module = Module,
    Parameter = Module.Parameter,
    is_parameter = Module.is_parameter,
    is_module = Module.is_module,
    ModuleList = containers.ModuleList,
    Sequential = containers.Sequential,
    init = require "nemo.nn.init_fns",
}
for k, v in pairs(layers) do nn[k] = v end

return nn
