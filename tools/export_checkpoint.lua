-- tools/export_checkpoint.lua: a training checkpoint (any layout: one file, FSDP2 / tp shards of
-- any number of ranks, a LoRA adapter) as a diffusers pipeline folder, as the recipe's final export:
--
--   nemo-lua tools/export_checkpoint.lua --checkpoint runs/flux/LOWEST_VAL --out flux-best
--            [--ema] [--model SOURCE_PIPELINE] [--force]
--
-- --checkpoint: a checkpoint folder, a checkpoint_dir (its newest), or a LATEST / LOWEST_VAL file.
-- --ema: the EMA averages (ema/) instead of the trained weights. --model: the source pipeline
-- whose other components (VAE, text encoders, scheduler) the folder carries; default the run's
-- model.pretrained_model_name_or_path. A LoRA checkpoint's adapter is merged into the weights.
-- --force replaces an existing --out. See nemo.checkpoint.export.
local function usage(msg)
    io.stderr:write((msg and ("export_checkpoint: " .. msg .. "\n") or "") ..
        "usage: nemo-lua tools/export_checkpoint.lua --checkpoint PATH --out DIR [--ema] [--model SOURCE] [--force]\n")
    os.exit(msg and 2 or 0)
end
local o = {}
local i = 1
while i <= #arg do
    local a = arg[i]
    if a == "--checkpoint" or a == "--out" or a == "--model" then
        if not arg[i + 1] then usage(a .. " needs a value") end
        o[a:sub(3)] = arg[i + 1]
        i = i + 2
    elseif a == "--ema" or a == "--force" then
        o[a:sub(3)] = true
        i = i + 1
    elseif a == "-h" or a == "--help" then
        usage()
    else
        usage("unknown argument '" .. a .. "'")
    end
end
if not o.checkpoint then usage("--checkpoint is required") end
if not o.out then usage("--out is required") end
require "nemo"
local ok, err = pcall(require("nemo.checkpoint").export, o.checkpoint, {out = o.out, model = o.model, ema = o.ema,
    force = o.force, log = print})
if not ok then
    io.stderr:write("export_checkpoint: ", tostring(err):gsub("^checkpoint%.export: ", ""), "\n")
    os.exit(1)
end
