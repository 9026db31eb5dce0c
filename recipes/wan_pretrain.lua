-- nemo-lua recipes/wan_pretrain.lua [-c config.yaml] [--section.key value ...]
-- Wan 2.1 text-to-video pretraining from random weights (from_config; see wan_pretrain.yaml
-- beside this file).
-- As shipped (demo.enabled) it first writes, once, a small Wan pipeline and a synthetic
-- video-latent cache (nemo.models.wan.demo_assets) and pretrains on CPU in about 35 s: this
-- script does it because nemo.train's own demo block builds FLUX assets only.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
local train = require "nemo.train"
local fs = require "nemo.fs"
local wan = require "nemo.models.wan"

local opts = {default_config = dir .. "/wan_pretrain.yaml", script = "recipes/wan_pretrain.lua"}

local function main(args)
    local a = train.parse_args(args)
    if a.help then return train.main(args, opts) end
    local path = a.config or opts.default_config
    if not fs.isfile(path) then error("config: config file not found: " .. tostring(path), 0) end
    local cfg = train.load_config(path, a.overrides)
    local d = cfg.demo
    if d and d.enabled then
        local root = d.dir and d.dir:gsub("^~/", (os.getenv("HOME") or ".") .. "/") or nil
        local model_dir, cache_dir = wan.demo_assets{root = root, transformer = d.transformer, samples = d.samples,
            resolutions = d.resolutions, text_len = d.text_len, seed = cfg.seed,
            log = function(msg) io.stdout:write(msg, "\n"); io.stdout:flush() end}
        cfg.model.pretrained_model_name_or_path = model_dir
        cfg.data.dataloader.cache_dir = cache_dir
        d.enabled = false
    end
    return train.run(cfg, opts)
end

-- as nemo.train.cli: a deliberate error (bad config, bad data, NaN loss) prints its message alone
-- and exits with status 1; an unexpected one (a bug) keeps its traceback
local ok, err = xpcall(main, function(e)
    e = tostring(e)
    if e:match("^[^%s:]+%.lua:%d+: ") then return debug.traceback(e, 2) end
    return e
end, arg or {})
if not ok then
    io.stdout:flush()
    io.stderr:write("nemo-lua: ", err, "\n")
    os.exit(1)
end
return err
