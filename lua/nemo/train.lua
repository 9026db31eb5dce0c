-- lua/nemo/train.lua: the flow-matching training recipe (Automodel's TrainDiffusionRecipe).
--
--   nemo-lua recipes/flux_finetune.lua [-c config.yaml] [--a.b.c value ...]
--
-- The config uses Automodel's YAML keys: model, optimizer, lr_scheduler, fsdp / ddp,
-- flow_matching, step_scheduler, data, checkpoint, dist_env, seed (plus wandb, performance,
-- clip_grad_norm, ci). Python `_target_` values that nemo-lua knows map to its own classes; an
-- unknown target, an unknown key or a wrong type is an error naming it before anything runs.
-- A `demo:` block (nemo-lua's own) makes the recipe create, once, a small FLUX-architecture
-- "pretrained" pipeline and a synthetic latent cache, so the recipe runs with no downloads.
--
-- Per optimizer step: zero_grad; for each of grad_acc micro-batches: flow-matching loss,
-- backward(loss / grad_acc); clip by global norm; AdamW step; LR schedule step; log; checkpoint.
-- Steps are counted from 0 as Automodel does (the logged step is the index of the step taken).
local ffi = require "ffi"
local nemo = require "nemo"
local fs = require "nemo.fs"
local json = require "nemo.json"
local yaml = require "nemo.yaml"
local pipeline = require "nemo.pipeline"
local lrs = require "nemo.lr_scheduler"
local checkpoint = require "nemo.checkpoint"

local M = {}

-- ==== config: schema, overrides, targets ====

local ANY = "any"
-- section -> key -> type ("string", "number", "boolean", "table", ANY) ; nested tables checked
-- by their own modules (flow_matching, lr_scheduler, pipeline_spec).
local SCHEMA = {
    seed = "number",
    model = {
        pretrained_model_name_or_path = "string", mode = "string", cache_dir = ANY, attention_backend = ANY,
        torch_dtype = "string", compute_dtype = "string", pipeline_spec = "table",
        transformer_engine_linear = "boolean", transformer_engine_fp8 = "boolean",
        transformer_engine_fp8_recipe = ANY, transformer_engine_fp8_amax_history_len = ANY,
        transformer_engine_fp8_amax_compute_algo = ANY, fuse_qkv_projections = "boolean",
        compact_fused_qkv_projections = "boolean", model_type = ANY, stage = ANY, boundary_ratio = ANY,
    },
    optimizer = {_target_ = "string", lr = "number", weight_decay = "number", betas = "table", eps = "number",
                 foreach = ANY, fused = ANY, amsgrad = "boolean"},
    lr_scheduler = "table",
    performance = {check_loss = "boolean", grad_clip_foreach = "boolean"},
    clip_grad_norm = {max_norm = "number"},
    fsdp = {dp_size = "number", dp_replicate_size = "number", tp_size = "number", cp_size = "number",
            pp_size = "number", ep_size = "number", activation_checkpointing = "boolean", cpu_offload = "boolean",
            defer_fsdp_grad_sync = "boolean", enable_compile = "boolean", enable_fsdp2_prefetch = "boolean",
            fsdp2_backward_prefetch_depth = "number", fsdp2_forward_prefetch_depth = "number",
            reduce_dtype = "string", cp_ring_degree = "number", cp_ulysses_degree = "number"},
    ddp = {dp_size = "number", activation_checkpointing = "boolean", bucket_cap_mb = "number",
           find_unused_parameters = "boolean", gradient_as_bucket_view = "boolean"},
    flow_matching = "table",
    step_scheduler = {num_epochs = "number", local_batch_size = "number", global_batch_size = "number",
                      ckpt_every_steps = "number", log_remote_every_steps = "number", max_steps = "number",
                      save_checkpoint_every_epoch = "boolean"},
    data = {dataloader = {_target_ = "string", cache_dir = "string", train_text_encoder = "boolean",
                          num_workers = "number", base_resolution = "table", dynamic_batch_size = "boolean",
                          shuffle = "boolean", drop_last = "boolean", model_type = "string", pin_memory = "boolean",
                          prefetch_factor = "number", batch_size = "number", latent_shape = "table",
                          text_len = "number", text_dim = "number", pooled_dim = "number", length = "number"}},
    checkpoint = {enabled = "boolean", checkpoint_dir = "string", model_save_format = "string",
                  save_consolidated = ANY, diffusers_compatible = "boolean", restore_from = ANY,
                  max_recent_checkpoints = "number"},
    dist_env = {backend = "string", init_method = "string", timeout_minutes = "number"},
    wandb = {enable = "boolean", project = ANY, mode = ANY, name = ANY, entity = ANY, dir = ANY},
    ci = "table",
    demo = {enabled = "boolean", dir = "string", samples = "number", resolutions = "string",
            transformer = "table", text_len = "number", progress = "boolean"},
    logging = {log_every = "number", progress = ANY, metrics_file = "string"},
}
M.SCHEMA = SCHEMA

-- Keys Automodel removed, with their replacement (it fails fast on them; so do we).
local REMOVED = {
    ["optim"] = "optimizer", ["optim.learning_rate"] = "optimizer.lr", ["optim.optimizer"] = "optimizer._target_",
    ["optim.clip_grad"] = "clip_grad_norm.max_norm", ["step_scheduler.log_every"] = "step_scheduler.log_remote_every_steps",
}

local OPTIMIZER_TARGETS = {["torch.optim.AdamW"] = true, ["nemo.optim.AdamW"] = true}
local DATALOADER_TARGETS = {
    ["nemo_automodel.components.datasets.diffusion.build_text_to_image_multiresolution_dataloader"] = "cache",
    ["nemo_automodel.components.datasets.diffusion.build_video_multiresolution_dataloader"] = "cache",
    ["nemo_automodel.components.datasets.diffusion.build_dataloader"] = "cache",
    ["nemo.data.build_dataloader"] = "cache",
    ["nemo_automodel.components.datasets.diffusion.build_mock_dataloader"] = "mock",
    ["nemo.data.MockDataLoader"] = "mock",
}
M.DATALOADER_TARGETS = DATALOADER_TARGETS

local function cfg_error(msg) error("config: " .. msg, 0) end

local function sorted_keys(t)
    local k = {}
    for n in pairs(t) do k[#k + 1] = n end
    table.sort(k)
    return k
end

local function check_section(path, value, schema)
    if schema == ANY then return end
    if type(schema) == "string" then
        if value ~= nil and value ~= yaml.null and type(value) ~= schema then
            cfg_error(string.format("'%s' must be a %s, got %s (%s)", path, schema, type(value), tostring(value)))
        end
        return
    end
    if type(value) ~= "table" then
        cfg_error(string.format("'%s' must be a mapping, got %s", path, type(value)))
    end
    for k, v in pairs(value) do
        local sub = path == "" and k or (path .. "." .. k)
        if REMOVED[sub] then cfg_error(string.format("'%s' was removed; use '%s'", sub, REMOVED[sub])) end
        local s = schema[k]
        if s == nil then
            cfg_error(string.format("unknown key '%s' (known keys of %s: %s)", sub, path == "" and "the config" or path,
                table.concat(sorted_keys(schema), ", ")))
        end
        check_section(sub, v, s)
    end
end

-- Parse "--a.b.c value" pairs (and -c / --config path); values are YAML scalars or flow lists.
function M.parse_args(args)
    local out = {overrides = {}}
    local i = 1
    while args[i] do
        local a = args[i]
        if a == "-c" or a == "--config" then
            if not args[i + 1] then cfg_error(a .. " needs a file") end
            out.config = args[i + 1]
            i = i + 2
        elseif a == "-h" or a == "--help" then
            out.help = true
            i = i + 1
        elseif a:match("^%-%-[%w_]") then
            local key, val = a:match("^%-%-([^=]+)=(.*)$")
            if not key then
                key = a:sub(3)
                val = args[i + 1]
                if val == nil then cfg_error("option --" .. key .. " needs a value") end
                i = i + 2
            else
                i = i + 1
            end
            out.overrides[#out.overrides + 1] = {key = key, text = val}
        else
            cfg_error("unexpected argument '" .. a .. "' (expected -c FILE or --section.key value)")
        end
    end
    return out
end

function M.apply_override(cfg, key, text)
    local v = yaml.load(text, "--" .. key)
    if v == nil then v = yaml.null end
    local node = cfg
    local parts = {}
    for p in key:gmatch("[^%.]+") do parts[#parts + 1] = p end
    for i = 1, #parts - 1 do
        local p = parts[i]
        if node[p] == nil then node[p] = {} end
        if type(node[p]) ~= "table" then
            cfg_error(string.format("--%s: '%s' is a value, not a section", key, table.concat(parts, ".", 1, i)))
        end
        node = node[p]
    end
    node[parts[#parts]] = v
end

local function strip_nulls(t)
    for k, v in pairs(t) do
        if v == yaml.null then t[k] = nil elseif type(v) == "table" then strip_nulls(v) end
    end
    return t
end

-- load_config(path, overrides) -> the validated config table.
function M.load_config(path, overrides)
    local cfg = yaml.load_file(path) or {}
    if type(cfg) ~= "table" then cfg_error(path .. ": expected a mapping at the top level") end
    for _, o in ipairs(overrides or {}) do M.apply_override(cfg, o.key, o.text) end
    strip_nulls(cfg)
    M.validate(cfg)
    return cfg
end

function M.validate(cfg)
    check_section("", cfg, SCHEMA)
    for _, req in ipairs { "model", "optimizer", "step_scheduler", "data", "checkpoint" } do
        if cfg[req] == nil then
            local examples = {
                optimizer = "optimizer:\n  _target_: torch.optim.AdamW\n  lr: 1.0e-4",
                checkpoint = "checkpoint:\n  enabled: true\n  checkpoint_dir: runs/my_run",
                data = "data:\n  dataloader:\n    _target_: nemo.data.build_dataloader\n    cache_dir: /path/to/cache",
                model = "model:\n  pretrained_model_name_or_path: black-forest-labs/FLUX.1-dev\n  mode: finetune",
                step_scheduler = "step_scheduler:\n  global_batch_size: 8\n  local_batch_size: 1\n  max_steps: 1000",
            }
            cfg_error(string.format("the '%s' section is required, for example:\n%s", req, examples[req]))
        end
    end
    if cfg.fsdp and cfg.ddp then cfg_error("'fsdp' and 'ddp' are mutually exclusive: keep one") end
    local t = cfg.optimizer._target_
    if t and not OPTIMIZER_TARGETS[t] then
        cfg_error(string.format("optimizer._target_ '%s' is not supported (known: %s)", t,
            table.concat(sorted_keys(OPTIMIZER_TARGETS), ", ")))
    end
    if cfg.optimizer.lr == nil then cfg_error("optimizer.lr is required") end
    local dl = cfg.data.dataloader
    if type(dl) ~= "table" then cfg_error("data.dataloader is required") end
    if dl._target_ and not DATALOADER_TARGETS[dl._target_] then
        cfg_error(string.format("data.dataloader._target_ '%s' is not supported (known: %s)", dl._target_,
            table.concat(sorted_keys(DATALOADER_TARGETS), ", ")))
    end
    local mode = cfg.model.mode or "finetune"
    if mode ~= "finetune" and mode ~= "pretrain" then
        cfg_error("model.mode must be 'finetune' or 'pretrain', got '" .. tostring(mode) .. "'")
    end
    if cfg.wandb and cfg.wandb.enable then
        cfg_error("wandb.enable: Weights & Biases logging is not available in nemo-lua; metrics go to " ..
            "<checkpoint_dir>/metrics.jsonl. Set wandb.enable: false")
    end
    local ss = cfg.step_scheduler
    for _, k in ipairs { "local_batch_size", "global_batch_size", "ckpt_every_steps", "log_remote_every_steps",
                         "max_steps", "num_epochs" } do
        local v = ss[k]
        if v ~= nil and (v < 1 or v % 1 ~= 0) then
            cfg_error(string.format("step_scheduler.%s must be a positive integer, got %s", k, tostring(v)))
        end
    end
    return cfg
end

-- ==== distributed layout (one process until the parallel managers exist) ====

local function world()
    local ws = tonumber(os.getenv("WORLD_SIZE") or os.getenv("OMPI_COMM_WORLD_SIZE") or os.getenv("SLURM_NTASKS") or "1") or 1
    return ws, tonumber(os.getenv("RANK") or os.getenv("OMPI_COMM_WORLD_RANK") or "0") or 0
end

local function data_parallel_size(cfg)
    local ws = world()
    local block = cfg.fsdp or cfg.ddp
    if ws > 1 then
        error("distributed training (world size " .. ws .. ") is not available yet in nemo-lua; run one process", 0)
    end
    if block then
        for _, k in ipairs { "tp_size", "cp_size", "pp_size", "ep_size" } do
            if block[k] and block[k] > 1 then
                cfg_error(string.format("%s.%s = %d: tensor/context/pipeline/expert parallelism is not supported yet",
                    cfg.fsdp and "fsdp" or "ddp", k, block[k]))
            end
        end
        local dp = (block.dp_size or ws) * (block.dp_replicate_size or 1)
        if dp ~= ws then
            cfg_error(string.format("%s.dp_size%s = %d does not match the world size %d (this run has %d process%s; " ..
                "pass --%s.dp_size %d)", cfg.fsdp and "fsdp" or "ddp", block.dp_replicate_size and " x dp_replicate_size" or "",
                dp, ws, ws, ws == 1 and "" or "es", cfg.fsdp and "fsdp" or "ddp", ws))
        end
    end
    return 1, 0
end

-- ==== the demo assets ====

local function expand_home(p)
    if p:sub(1, 2) == "~/" then return (os.getenv("HOME") or ".") .. p:sub(2) end
    return p
end

local function ensure_demo(cfg, log)
    local d = cfg.demo
    local root = expand_home(d.dir or ((os.getenv("XDG_CACHE_HOME") or ((os.getenv("HOME") or ".") .. "/.cache")) .. "/nemo-lua/demo"))
    local tcfg = d.transformer or {}
    local key = json.encode(tcfg) .. "|" .. tostring(d.samples) .. "|" .. tostring(d.resolutions) .. "|" .. tostring(d.text_len)
    local h = 0
    for i = 1, #key do h = (h * 31 + key:byte(i)) % 2147483647 end
    local base = string.format("%s/flux-%08x", root, h)
    local model_dir, cache_dir = base .. "/pipeline", base .. "/cache"
    if not fs.isfile(model_dir .. "/model_index.json") then
        log(string.format("demo: creating a small FLUX-architecture pipeline in %s (once)", model_dir))
        nemo.manual_seed(cfg.seed or 42)
        local spec = {transformer_cls = "FluxTransformer2DModel"}
        local Flux = pipeline._import_diffusers_class("FluxTransformer2DModel")
        local model = Flux(tcfg)
        local pipe = setmetatable({class_name = "FluxPipeline", components = {transformer = model},
                                   component_names = {"transformer"}, skipped = {}, config = {}},
                                  getmetatable(pipeline.NeMoAutoDiffusionPipeline) or {__index = pipeline.NeMoAutoDiffusionPipeline})
        local _ = spec
        fs.mkdirs(base)
        pipeline.NeMoAutoDiffusionPipeline.save_pretrained(pipe, model_dir)
    end
    if not fs.isfile(cache_dir .. "/index.json") then
        log(string.format("demo: writing a synthetic latent cache in %s (once)", cache_dir))
        local mcfg = require("nemo.models").registry.FluxTransformer2DModel
        local _ = mcfg
        require("nemo.data.synthetic").make {
            out = cache_dir, samples = d.samples or 256, model = "flux", resolutions = d.resolutions or "16x16",
            seed = cfg.seed or 42, text_len = d.text_len or 8,
            text_dim = tcfg.joint_attention_dim or 32, pooled_dim = tcfg.pooled_projection_dim or 32,
            channels = math.floor((tcfg.in_channels or 64) / 4),
        }
    end
    cfg.model.pretrained_model_name_or_path = model_dir
    cfg.data.dataloader.cache_dir = cache_dir
end

-- ==== logging ====

local is_tty = false
pcall(function()
    ffi.cdef "int isatty(int fd);"
    is_tty = ffi.C.isatty(1) == 1
end)

local function now()
    return os.time() + (os.clock() % 1) * 0   -- replaced below with a monotonic clock
end
pcall(function()
    ffi.cdef [[ typedef struct { long tv_sec; long tv_nsec; } nemo_train_ts; int clock_gettime(int, nemo_train_ts *); ]]
    local ts = ffi.new("nemo_train_ts")
    now = function() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 end
end)

local function fmt_time(s)
    if s ~= s or s == math.huge then return "?" end
    s = math.floor(s + 0.5)
    if s >= 3600 then return string.format("%dh%02dm", math.floor(s / 3600), math.floor(s % 3600 / 60)) end
    return string.format("%dm%02ds", math.floor(s / 60), s % 60)
end

-- ==== the run ====

local function build_optimizer(cfg, params)
    local o = cfg.optimizer
    return nemo.optim.AdamW(params, {lr = o.lr, betas = o.betas or {0.9, 0.999}, eps = o.eps or 1e-8,
                                     weight_decay = o.weight_decay or 0.01, amsgrad = o.amsgrad})
end

local function build_data(cfg, dp_size, dp_rank, seed)
    local dl = cfg.data.dataloader
    local kind = DATALOADER_TARGETS[dl._target_ or "nemo.data.build_dataloader"]
    local data = require "nemo.data"
    local bs = cfg.step_scheduler.local_batch_size or 1
    if kind == "mock" then
        local loader = data.MockDataLoader {batch_size = bs, latent_shape = dl.latent_shape or {16, 32, 32},
            text_len = dl.text_len or 64, text_dim = dl.text_dim or 4096, pooled_dim = dl.pooled_dim or 768,
            seed = seed, length = dl.length or 1024}
        return loader
    end
    if not dl.cache_dir then cfg_error("data.dataloader.cache_dir is required (a latent cache folder; see docs/data.md)") end
    if not fs.isdir(dl.cache_dir) then cfg_error("data.dataloader.cache_dir: no folder at '" .. dl.cache_dir .. "'") end
    local loader = data.build_dataloader {cache_dir = dl.cache_dir, model_type = dl.model_type, batch_size = bs,
        seed = seed, shuffle = dl.shuffle ~= false, drop_last = dl.drop_last ~= false, dp_rank = dp_rank, dp_size = dp_size}
    return loader
end

local function model_signature(model)
    local cfg = {}
    for k, v in pairs(model.config or {}) do cfg[k] = v end
    cfg._class_name = (tostring(model.__name or "?"):match("([^%.]+)$"))
    return cfg
end

local function same_config(a, b)
    return json.encode(a) == json.encode(b)
end

-- run(cfg, {log=}) -> summary {steps, first_loss, last_loss, checkpoint, ...}
function M.run(cfg, opts)
    opts = opts or {}
    local log = opts.log or function(msg) io.stdout:write(msg, "\n"); io.stdout:flush() end
    M.validate(cfg)
    if cfg.demo and cfg.demo.enabled then ensure_demo(cfg, log) end
    local seed = cfg.seed or 42
    nemo.manual_seed(seed)
    local dp_size, dp_rank = data_parallel_size(cfg)

    -- model
    local mcfg = cfg.model
    local torch_dtype = mcfg.torch_dtype or "bfloat16"
    local compute_dtype = mcfg.compute_dtype or torch_dtype
    if compute_dtype ~= torch_dtype then
        cfg_error(string.format("model.compute_dtype (%s) differs from model.torch_dtype (%s): mixed precision " ..
            "(float32 master weights, bf16 compute) is not available yet; set them equal", compute_dtype, torch_dtype))
    end
    local block = cfg.fsdp or cfg.ddp or {}
    local ac = block.activation_checkpointing
    if ac == nil then ac = cfg.fsdp ~= nil end   -- Automodel: diffusion default true when the key is absent
    local ignored = {}
    for _, k in ipairs { "transformer_engine_fp8", "transformer_engine_linear", "fuse_qkv_projections" } do
        if mcfg[k] then ignored[#ignored + 1] = "model." .. k end
    end
    if mcfg.attention_backend and mcfg.attention_backend ~= yaml.null then ignored[#ignored + 1] = "model.attention_backend" end
    if block.enable_compile then ignored[#ignored + 1] = "enable_compile" end
    if #ignored > 0 then
        log("note: GPU-only features that nemo-lua does not have, ignored on this run: " .. table.concat(ignored, ", "))
    end
    local device = opts.device or pipeline._choose_device()
    local pipe
    local mode = mcfg.mode or "finetune"
    if not mcfg.pretrained_model_name_or_path then cfg_error("model.pretrained_model_name_or_path is required") end
    if mode == "finetune" then
        pipe = pipeline.NeMoAutoDiffusionPipeline.from_pretrained(mcfg.pretrained_model_name_or_path, {
            torch_dtype = torch_dtype, device = device, load_for_training = true, components_to_load = {"transformer"},
            enable_gradient_checkpointing = ac})
    else
        pipe = pipeline.NeMoAutoDiffusionPipeline.from_config(mcfg.pretrained_model_name_or_path, mcfg.pipeline_spec,
            {torch_dtype = torch_dtype, device = device, enable_gradient_checkpointing = ac})
    end
    local model = pipe.transformer
    if not model then error("the pipeline has no transformer to train", 0) end
    if not ac and model.disable_gradient_checkpointing then model:disable_gradient_checkpointing() end
    model:train()
    local params = {}
    for _, p in model:named_parameters() do if p.requires_grad then params[#params + 1] = p end end

    -- data, batch math
    local ss = cfg.step_scheduler
    local local_bs = ss.local_batch_size or 1
    local global_bs = ss.global_batch_size or local_bs * dp_size
    if global_bs % (local_bs * dp_size) ~= 0 then
        cfg_error(string.format("step_scheduler.global_batch_size (%d) must be a multiple of local_batch_size (%d) x " ..
            "data-parallel size (%d)", global_bs, local_bs, dp_size))
    end
    local grad_acc = math.floor(global_bs / (local_bs * dp_size))
    local loader = build_data(cfg, dp_size, dp_rank, seed)
    local batches_per_epoch = loader:len()
    local steps_per_epoch = math.ceil(batches_per_epoch / grad_acc)
    local num_epochs = ss.num_epochs or 1
    local total = steps_per_epoch * num_epochs
    if ss.max_steps then total = math.min(total, ss.max_steps) end
    if total < 1 then error("no optimizer step can be taken (empty dataset or max_steps 0)", 0) end

    -- the latent shape must fit the model (a clear error before training)
    if model.config and model.config.in_channels and loader.dataset and loader.dataset.samples then
        local s = loader.dataset:get(1)
        local C = s.latents.shape[1]
        local want = mode and model.config.in_channels
        local packed = (tostring(model.__name):find("Flux") and C * 4) or C
        if packed ~= want then
            cfg_error(string.format("the latents in %s have %d channels (%d packed), but the model's in_channels is %d",
                cfg.data.dataloader.cache_dir, C, packed, want))
        end
    end

    -- optimizer, schedule, objective
    local opt = build_optimizer(cfg, params)
    local sched = cfg.lr_scheduler and lrs.build(opt, cfg.lr_scheduler, total) or lrs.constant(opt)
    local fm = require("nemo.flow_matching").FlowMatching(cfg.flow_matching)
    local max_norm = (cfg.clip_grad_norm and cfg.clip_grad_norm.max_norm) or 1.0
    local check_loss = cfg.performance and cfg.performance.check_loss
    local fm_gen = nemo.Generator(seed * 1000003 + 17)

    -- checkpoints and resume
    local ck = cfg.checkpoint
    local ck_enabled = ck.enabled ~= false
    local ck_dir = ck.checkpoint_dir or "checkpoints"
    local ck_every = ss.ckpt_every_steps or total
    local step, epoch, batch_in_epoch = 0, 0, 0
    local sig = model_signature(model)
    if ck_enabled then
        local restore = ck.restore_from
        local dir
        if restore then dir = checkpoint.resolve(restore, ck_dir) else dir = checkpoint.latest(ck_dir) end
        if dir then
            local saved = checkpoint.model_config(dir)
            if saved and not same_config(saved, sig) then
                error(string.format("checkpoint %s was written for another model config (%s) than this run's (%s); " ..
                    "use another checkpoint_dir or set checkpoint.restore_from", dir, json.encode(saved), json.encode(sig)), 0)
            end
            local tr = checkpoint.load(dir, {model = model, optimizer = opt, scheduler = sched})
            step = tr.step + 1
            epoch = tr.next_epoch or tr.epoch
            if tr.sampler then loader:load_state_dict(tr.sampler) end
            if tr.rng then
                if tr.rng.flow then fm_gen:set_state(tr.rng.flow) end
                if tr.rng.default then nemo.default_generator:set_state(tr.rng.default) end
            end
            batch_in_epoch = tr.sampler and tr.sampler.batch_index or 0
            log(string.format("resumed from %s at step %d", dir, step))
        end
        fs.mkdirs(ck_dir)
    end
    if step >= total then
        log(string.format("training already finished: step %d of %d (checkpoints in %s)", step, total, ck_dir))
        return {steps = 0, total = total, checkpoint_dir = ck_dir, finished = true}
    end

    local metrics_path = (cfg.logging and cfg.logging.metrics_file) or (ck_dir .. "/metrics.jsonl")
    fs.mkdirs(fs.dirname(metrics_path))
    local metrics = assert(io.open(metrics_path, "a"))
    local log_every = ss.log_remote_every_steps or 1
    local progress = opts.progress
    if progress == nil then progress = is_tty end
    if cfg.logging and cfg.logging.progress ~= nil then progress = cfg.logging.progress end

    log(string.format("training %s (%s, %d parameters) on %s: %d steps, global batch %d = %d x %d grad-acc, %d batches/epoch",
        sig._class_name, mode, model:num_parameters(), device, total, global_bs, local_bs, grad_acc, batches_per_epoch))

    local summary = {first_loss = nil, last_loss = nil, steps = 0, total = total, checkpoint_dir = ck_dir}
    local t_start = now()
    local steps_this_run = 0
    local last_ckpt
    local function save(at_step, next_epoch)
        if not ck_enabled then return end
        local tr = {sampler = loader:state_dict(), rng = {flow = fm_gen:get_state(), default = nemo.default_generator:get_state()},
                    next_epoch = next_epoch}
        last_ckpt = checkpoint.save(ck_dir, {epoch = epoch, step = at_step, model = model, optimizer = opt, scheduler = sched,
            trainer = tr, config = cfg, model_config = sig})
    end

    local done = false
    while not done and epoch < num_epochs do
        loader:set_epoch(epoch)
        if batch_in_epoch == 0 and loader.sampler then loader.sampler._skip = 0 end
        local it = loader:iter()
        local micro = {}
        local finished_epoch = false
        while not done do
            -- gather one optimizer step's micro-batches
            micro = {}
            for _ = 1, grad_acc do
                local b = it()
                if not b then break end
                micro[#micro + 1] = b
            end
            if #micro == 0 then finished_epoch = true; break end
            local t0 = now()
            opt:zero_grad()
            local loss_sum = 0
            for _, batch in ipairs(micro) do
                local loss = fm:step(model, batch, {generator = fm_gen, compute_dtype = compute_dtype})
                local lv = loss:item()
                if lv ~= lv or lv == math.huge or lv == -math.huge then
                    metrics:close()
                    error(string.format("loss is %s at step %d (epoch %d): training stopped; no checkpoint was " ..
                        "written from this state%s", tostring(lv), step, epoch,
                        last_ckpt and ("; the last good one is " .. last_ckpt) or ""), 0)
                end
                if check_loss and lv > 100 then
                    metrics:close()
                    error(string.format("loss exploded (%g > 100) at step %d (performance.check_loss)", lv, step), 0)
                end
                loss_sum = loss_sum + lv
                local scaled = loss / #micro
                scaled:backward()
                loss = nil
            end
            local grad_norm = nemo.optim.clip_grad_norm_(params, max_norm)
            if grad_norm ~= grad_norm or grad_norm == math.huge then
                metrics:close()
                error(string.format("gradient norm is %s at step %d: training stopped; no checkpoint was written from " ..
                    "this state", tostring(grad_norm), step), 0)
            end
            local lr = opt.param_groups[1].lr
            opt:step()
            sched:step(1)
            collectgarbage()
            local dt = now() - t0
            local mean_loss = loss_sum / #micro
            summary.first_loss = summary.first_loss or mean_loss
            summary.last_loss = mean_loss
            steps_this_run = steps_this_run + 1
            local mem = nemo.memory_stats(device)
            metrics:write(json.encode({step = step, epoch = epoch, loss = mean_loss, lr = lr, grad_norm = grad_norm,
                step_time = dt, samples_per_sec = (#micro * local_bs * dp_size) / dt,
                peak_memory_gb = mem.peak / 2^30}), "\n")
            metrics:flush()
            local elapsed = now() - t_start
            local eta = elapsed / steps_this_run * (total - step - 1)
            if progress then
                local width = 24
                local fill = math.floor(width * (step + 1) / total)
                io.stdout:write(string.format("\r[%s%s] step %d/%d  loss %.4f  lr %.2e  %.3f s/step  ETA %s   ",
                    string.rep("#", fill), string.rep(".", width - fill), step + 1, total, mean_loss, lr, dt, fmt_time(eta)))
                io.stdout:flush()
            elseif step % log_every == 0 or step == total - 1 then
                log(string.format("step %d/%d epoch %d loss %.6f lr %.3e grad_norm %.4f %.3f s/step ETA %s",
                    step, total, epoch, mean_loss, lr, grad_norm, dt, fmt_time(eta)))
            end
            local last = step == total - 1
            if last then done = true end
            if ck_enabled and (step % ck_every == ck_every - 1 or last) then save(step, epoch) end
            step = step + 1
        end
        if finished_epoch then
            epoch = epoch + 1
            batch_in_epoch = 0
            if ss.save_checkpoint_every_epoch and ck_enabled and not done then save(step - 1, epoch) end
        end
    end
    if progress then io.stdout:write("\n") end
    metrics:close()
    summary.steps = steps_this_run
    summary.checkpoint = last_ckpt
    summary.seconds = now() - t_start

    -- the consolidated diffusers export
    local consolidated = ck.save_consolidated
    if ck_enabled and last_ckpt and consolidated ~= false and consolidated ~= "never" then
        local out = last_ckpt .. "/diffusers"
        pipe:save_pretrained(out)
        summary.diffusers = out
        log("saved the trained pipeline for diffusers in " .. out)
    end
    log(string.format("done: %d steps in %.1f s, loss %.4f -> %.4f", steps_this_run, summary.seconds,
        summary.first_loss or 0 / 0, summary.last_loss or 0 / 0))
    return summary
end

-- main(arg, {default_config=}): the recipes' entry point.
function M.main(args, opts)
    opts = opts or {}
    local a = M.parse_args(args or {})
    if a.help then
        print("usage: nemo-lua " .. (opts.script or "recipe.lua") .. " [-c config.yaml] [--section.key value ...]\n" ..
              "default config: " .. tostring(opts.default_config))
        return
    end
    local path = a.config or opts.default_config
    if not path or not fs.isfile(path) then cfg_error("config file not found: " .. tostring(path)) end
    local cfg = M.load_config(path, a.overrides)
    return M.run(cfg, opts)
end

return M
