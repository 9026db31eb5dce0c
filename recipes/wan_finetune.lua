-- nemo-lua recipes/wan_finetune.lua [-c config.yaml] [--section.key value ...]
-- Wan 2.1 text-to-video finetuning with flow matching (see wan_finetune.yaml beside this file and
-- docs/training.md). As shipped it trains a small Wan-architecture demo on CPU in about 20 s.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
require("nemo.train").cli(arg, {default_config = dir .. "/wan_finetune.yaml", script = "recipes/wan_finetune.lua"})
