-- nemo-lua recipes/flux_finetune.lua [-c config.yaml] [--section.key value ...]
-- FLUX finetuning with flow matching (see flux_finetune.yaml beside this file and docs/training.md).
-- As shipped it trains a small FLUX-architecture demo on CPU in about a minute.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
require("nemo.train").cli(arg, {default_config = dir .. "/flux_finetune.yaml", script = "recipes/flux_finetune.lua"})
