-- nemo-lua recipes/flux_finetune.lua [-c config.yaml] [--section.key value ...]
-- FLUX finetuning with flow matching (see flux_finetune.yaml beside this file).
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
require("nemo.train").main(arg, {default_config = dir .. "/flux_finetune.yaml", script = "recipes/flux_finetune.lua"})
