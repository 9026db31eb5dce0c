-- nemo-lua recipes/wan_pretrain.lua [-c config.yaml] [--section.key value ...]
-- Wan 2.1 text-to-video pretraining from random weights (from_config; see wan_pretrain.yaml beside
-- this file and docs/training.md). As shipped it pretrains a small Wan demo on CPU in about 35 s.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
require("nemo.train").cli(arg, {default_config = dir .. "/wan_pretrain.yaml", script = "recipes/wan_pretrain.lua"})
