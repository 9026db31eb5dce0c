-- nemo-lua recipes/flux_lora.lua [-c config.yaml] [--section.key value ...]
-- FLUX LoRA finetuning with flow matching (see flux_lora.yaml beside this file and docs/training.md).
-- As shipped it trains adapters on a small FLUX-architecture demo on CPU.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
require("nemo.train").cli(arg, {default_config = dir .. "/flux_lora.yaml", script = "recipes/flux_lora.lua"})
