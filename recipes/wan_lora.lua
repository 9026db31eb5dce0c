-- nemo-lua recipes/wan_lora.lua [-c config.yaml] [--section.key value ...]
-- Wan 2.1 text-to-video LoRA finetuning with flow matching (see wan_lora.yaml beside this file and
-- docs/training.md). As shipped it trains adapters on a small Wan-architecture demo on CPU.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
require("nemo.train").cli(arg, {default_config = dir .. "/wan_lora.yaml", script = "recipes/wan_lora.lua"})
