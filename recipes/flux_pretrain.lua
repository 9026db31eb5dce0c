-- nemo-lua recipes/flux_pretrain.lua [-c config.yaml] [--section.key value ...]
-- FLUX pretraining from random weights (see flux_pretrain.yaml beside this file and docs/training.md).
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
require("nemo.train").cli(arg, {default_config = dir .. "/flux_pretrain.yaml", script = "recipes/flux_pretrain.lua"})
