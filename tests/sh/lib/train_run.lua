-- tests/sh/lib/train_run.lua: the training recipe with a stop: nemo-lua tests/sh/lib/train_run.lua
-- STOP_AFTER [--section.key value ...] runs recipes/flux_finetune.yaml with the overrides and ends
-- after STOP_AFTER steps (0: run to the end), as an interrupted job would (TRAIN_RECIPE: another
-- recipe config, e.g. recipes/wan_finetune.yaml). For test_train_dist.sh.
local stop = tonumber(arg[1]) or 0
local args = {}
for i = 2, #arg do args[#args + 1] = arg[i] end
require("nemo.train").cli(args, {stop_after = stop > 0 and stop or nil, default_config = os.getenv("TRAIN_RECIPE") or "recipes/flux_finetune.yaml",
    script = "tests/sh/lib/train_run.lua"})
