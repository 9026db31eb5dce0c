-- nemo-lua recipes/flux_pretrain.lua [-c config.yaml] [--section.key value ...]
-- FLUX pretraining from random weights (see flux_pretrain.yaml beside this file).
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
require("nemo.train").main(arg, {default_config = dir .. "/flux_pretrain.yaml", script = "recipes/flux_pretrain.lua"})
