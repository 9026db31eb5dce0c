-- lua/nemo/train.lua: the flow-matching training recipe (Automodel's TrainDiffusionRecipe).
--
--   nemo-lua recipes/flux_finetune.lua [-c config.yaml] [--a.b.c value ...]
--   require("nemo.train").run(cfg, opts)      -- the same from Lua (tests, the REPL)
--
-- The config uses Automodel's YAML keys: model, optimizer, lr_scheduler, fsdp / ddp,
-- flow_matching, step_scheduler, data, checkpoint, dist_env, seed (plus clip_grad_norm,
-- performance, wandb, profiling, ci). Python `_target_` values that nemo-lua knows map to its own
-- classes; an unknown target, an unknown key, a removed Automodel key or a wrong type is an error
-- naming it before anything runs. A `demo:` block (nemo-lua's own) makes the recipe create,
-- once, a small FLUX-architecture "pretrained" pipeline (from_config + save_pretrained) and a
-- synthetic latent cache, so the recipe runs with no downloads. docs/training.md lists the keys.
--
-- Per optimizer step: zero_grad; for each of the step's micro-batches (grad_acc of them; the last
-- step of an epoch may get fewer): flow-matching loss, backward(loss / #micro); clip by global
-- norm; AdamW step; LR schedule step; metrics line; checkpoint when due. Steps are counted from
-- 0 as Automodel does: "step S" is the index of the step just taken, in the log, in
-- metrics.jsonl and in checkpoint names (epoch_E_step_S).
--
-- The non-obvious rule: everything that decides the numbers of step S+1 is in the checkpoint of
-- step S (weights, AdamW moments and counts, LR-schedule position, the flow-matching generator,
-- the data sampler's next position), so 10 steps equal 5 steps + resume + 5 steps bit for bit.
-- The sampler position saved is where the NEXT step starts: after the last step of an epoch
-- that is (epoch + 1, batch 0), while the checkpoint is still named after the epoch it ended.
local ffi = require "ffi"
local nemo = require "nemo"
local nffi = require "nemo.ffi"
local fs = require "nemo.fs"
local json = require "nemo.json"
local yaml = require "nemo.yaml"
local pipeline = require "nemo.pipeline"
local lrs = require "nemo.lr_scheduler"
local checkpoint = require "nemo.checkpoint"
local dist = require "nemo.dist"
local flops = require "nemo.flops"

local M = {}

-- ==== config: schema, removed keys, targets ====

local ANY = "any"

-- model.pipeline_spec: PipelineSpec's fields (lua/nemo/pipeline.lua), checked in every mode (a
-- finetune does not use it, but a misspelt key is still an error).
local PIPELINE_SPEC = {}
for k, f in pairs(pipeline.PipelineSpec.FIELDS) do PIPELINE_SPEC[k] = f.type end

-- profiling: the torch-profiler block Automodel's diffusion recipe read (TrainDiffusionRecipe.
-- _build_torch_profiler, removed upstream in May 2026), flat or under `torch_profiler:`. nemo-lua
-- has no profiler: `enabled: true` is noted as ignored.
local PROFILER = {enabled = "boolean", output_dir = "string", wait_steps = "number", warmup_steps = "number",
                  active_steps = "number", ["repeat"] = "number", ranks = ANY, record_shapes = "boolean",
                  profile_memory = "boolean", with_stack = "boolean", with_flops = "boolean", row_limit = "number"}
local PROFILING = {torch_profiler = PROFILER}
for k, v in pairs(PROFILER) do PROFILING[k] = v end

-- ci: Automodel's CI metadata (tests/ci_tests: generate_ci_tests.py, config_resolver.py,
-- README.md "Recipe CI Configuration"), read by its CI tooling, never by the recipe. The scalar
-- keys are checked by name; env_vars, checkpoint_robustness, downstream_eval and the per-phase
-- override blocks (nightly, convergence, release: dotted config keys) are open mappings.
local CI = {recipe_owner = ANY, time = ANY, nodes = "number", node_multiplier = ANY, max_steps = "number",
            local_batch_size = "number", nproc_per_node = "number", ep_size = "number", cluster_tag = ANY,
            known_issue_id = ANY, allow_failure = "boolean", env_vars = "table", checkpoint_robustness = "table",
            downstream_eval = "table", vllm_deploy = "boolean", vllm_deploy_time = ANY, vllm_deploy_gpus = "number",
            vllm_deploy_known_issue_id = ANY, vllm_enable_expert_parallel = "boolean", vllm_smoke_test = "boolean",
            embed_eval = ANY, rerank_eval = ANY, nightly = "table", convergence = "table", release = "table"}

-- section -> key -> type ("string", "number", "boolean", "table", ANY). Tables given as "table"
-- are open here and checked by their own modules (flow_matching, lr_scheduler, peft: nemo.peft's
-- PeftConfig) or not read at all (ci's open blocks). demo.transformer is checked against the demo model's
-- config fields (nemo.models.flux / nemo.models.wan CONFIG_FIELDS) by M.validate.
local SCHEMA = {
    seed = "number",
    device = "string",
    model = {
        pretrained_model_name_or_path = "string", mode = "string", cache_dir = ANY, attention_backend = ANY,
        torch_dtype = "string", compute_dtype = "string", pipeline_spec = PIPELINE_SPEC,
        transformer_engine_linear = "boolean", transformer_engine_fp8 = "boolean",
        transformer_engine_fp8_recipe = ANY, transformer_engine_fp8_amax_history_len = ANY,
        transformer_engine_fp8_amax_compute_algo = ANY, fuse_qkv_projections = "boolean",
        compact_fused_qkv_projections = "boolean", optimize_hunyuan_flash_varlen_mask = "boolean",
        model_type = ANY, stage = ANY, boundary_ratio = ANY,
    },
    optimizer = {_target_ = "string", lr = "number", weight_decay = "number", betas = "table", eps = "number",
                 foreach = ANY, fused = ANY, amsgrad = "boolean", maximize = "boolean", capturable = "boolean",
                 differentiable = "boolean"},
    lr_scheduler = "table",
    performance = {check_loss = "boolean", grad_clip_foreach = "boolean"},
    clip_grad_norm = {max_norm = "number"},
    ema = {enabled = "boolean", decay = "number", min_decay = "number", update_after_step = "number",
           use_ema_warmup = "boolean", inv_gamma = "number", power = "number", export = "boolean"},
    fsdp = {dp_size = "number", dp_replicate_size = "number", tp_size = "number", cp_size = "number",
            pp_size = "number", ep_size = "number", activation_checkpointing = "boolean", cpu_offload = "boolean",
            defer_fsdp_grad_sync = "boolean", enable_compile = "boolean", enable_fsdp2_prefetch = "boolean",
            fsdp2_backward_prefetch_depth = "number", fsdp2_forward_prefetch_depth = "number",
            reduce_dtype = "string", cp_ring_degree = "number", cp_ulysses_degree = "number", backend = "string"},
    ddp = {dp_size = "number", activation_checkpointing = "boolean", bucket_cap_mb = "number",
           find_unused_parameters = "boolean", gradient_as_bucket_view = "boolean", backend = "string"},
    flow_matching = "table",
    step_scheduler = {num_epochs = "number", local_batch_size = "number", global_batch_size = "number",
                      ckpt_every_steps = "number", log_remote_every_steps = "number", max_steps = "number",
                      save_checkpoint_every_epoch = "boolean", val_every_steps = "number",
                      loss_average_window_steps = "number", gc_every_steps = "number", preemption_signal = ANY},
    data = {dataloader = {_target_ = "string", cache_dir = "string", train_text_encoder = "boolean",
                          num_workers = "number", base_resolution = "table", dynamic_batch_size = "boolean",
                          shuffle = "boolean", drop_last = "boolean", model_type = "string", pin_memory = "boolean",
                          prefetch_factor = "number", device = "string", batch_size = "number",
                          latent_shape = "table", text_len = "number", text_dim = "number", pooled_dim = "number",
                          length = "number"}},
    checkpoint = {enabled = "boolean", checkpoint_dir = "string", model_save_format = "string",
                  save_consolidated = ANY, diffusers_compatible = "boolean", restore_from = ANY,
                  max_recent_checkpoints = "number", is_async = "boolean", cpu_offload = "boolean",
                  single_rank_consolidation = "boolean", consolidation_timeout_minutes = "number",
                  v4_compatible = "boolean", staging_dir = ANY, trainable_only = "boolean", best_metric_key = ANY},
    dist_env = {backend = "string", init_method = "string", timeout_minutes = "number"},
    wandb = {enable = "boolean", project = ANY, mode = ANY, name = ANY, entity = ANY, dir = ANY},
    peft = "table",
    profiling = PROFILING,
    ci = CI,
    demo = {enabled = "boolean", model = "string", dir = "string", samples = "number", resolutions = "string",
            transformer = "table", text_len = "number"},
    logging = {log_every = "number", progress = "boolean", metrics_file = "string"},
    validation = require("nemo.validation").KEYS,
}
M.SCHEMA = SCHEMA

-- Keys Automodel removed (it fails fast on them, naming the replacement; so do we).
local REMOVED = {
    ["optim.learning_rate"] = "optimizer.lr",
    ["optim.optimizer"] = "optimizer (with an explicit _target_, e.g. torch.optim.AdamW)",
    ["optim.clip_grad"] = "clip_grad_norm.max_norm",
    ["step_scheduler.log_every"] = "step_scheduler.log_remote_every_steps",
}
M.REMOVED = REMOVED

local OPTIMIZER_TARGETS = {["torch.optim.AdamW"] = true, ["nemo.optim.AdamW"] = true}
-- model.model_type (required with peft) -> the transformer class it names
local PEFT_MODEL_TYPES = {flux = "FluxTransformer2DModel", wan = "WanTransformer3DModel"}
local DATALOADER_TARGETS = {
    ["nemo_automodel.components.datasets.diffusion.build_text_to_image_multiresolution_dataloader"] = "cache",
    ["nemo_automodel.components.datasets.diffusion.collate_fns.build_text_to_image_multiresolution_dataloader"] = "cache",
    ["nemo_automodel.components.datasets.diffusion.build_video_multiresolution_dataloader"] = "cache",
    ["nemo_automodel.components.datasets.diffusion.collate_fns.build_video_multiresolution_dataloader"] = "cache",
    ["nemo_automodel.components.datasets.diffusion.build_dataloader"] = "cache",
    ["nemo_automodel.components.datasets.diffusion.meta_files_dataset.build_dataloader"] = "cache",
    ["nemo.data.build_dataloader"] = "cache",
    ["nemo_automodel.components.datasets.diffusion.build_mock_dataloader"] = "mock",
    ["nemo_automodel.components.datasets.diffusion.mock_dataloader.build_mock_dataloader"] = "mock",
    ["nemo.data.MockDataLoader"] = "mock",
}
M.OPTIMIZER_TARGETS = OPTIMIZER_TARGETS
M.DATALOADER_TARGETS = DATALOADER_TARGETS

-- An error message without the "file.lua:123: " a lower module's error() put in front of it.
local function strip_pos(msg)
    msg = tostring(msg)
    while true do
        local rest = msg:match("^[^%s:]+%.lua:%d+: (.*)$")
        if not rest then return msg end
        msg = rest
    end
end
M._strip_pos = strip_pos

local function cfg_error(msg) error("config: " .. strip_pos(msg), 0) end
-- a wrapped error from a lower module, without its file:line
local function raise(prefix, msg) error(prefix .. strip_pos(msg), 0) end

local function sorted_keys(t)
    local k = {}
    for n in pairs(t) do k[#k + 1] = tostring(n) end
    table.sort(k)
    return k
end

local function is_posint(v) return type(v) == "number" and v >= 1 and v % 1 == 0 end

-- Unknown keys anywhere in the tree, as {"'a.b'", ...} (with the known keys of their section).
local function unknown_keys(path, value, schema, out)
    if type(schema) ~= "table" or type(value) ~= "table" then return out end
    for _, k in ipairs(sorted_keys(value)) do
        local sub = path == "" and k or (path .. "." .. k)
        if schema[k] == nil then
            out[#out + 1] = {key = sub, section = path == "" and "the config" or path, known = sorted_keys(schema)}
        else
            unknown_keys(sub, value[k], schema[k], out)
        end
    end
    return out
end

local function check_types(path, value, schema)
    if schema == ANY then return end
    if type(schema) == "string" then
        if value ~= nil and value ~= yaml.null and type(value) ~= schema then
            cfg_error(string.format("'%s' must be a %s, got %s (%s)", path, schema, type(value), tostring(value)))
        end
        return
    end
    if type(value) ~= "table" then
        cfg_error(string.format("'%s' must be a mapping, got %s (%s)", path == "" and "the config" or path, type(value),
            tostring(value)))
    end
    for _, k in ipairs(sorted_keys(value)) do
        check_types(path == "" and k or (path .. "." .. k), value[k], schema[k])
    end
end

-- Every unknown key in one message (each with the known keys of its section), then the types.
local function check_section(path, value, schema)
    if type(value) ~= "table" then cfg_error("expected a mapping at the top level, got " .. type(value)) end
    local unknown = unknown_keys(path, value, schema, {})
    if #unknown > 0 then
        local lines, names = {}, {}
        for _, u in ipairs(unknown) do
            names[#names + 1] = "'" .. u.key .. "'"
            lines[#lines + 1] = string.format("  %s: known keys of %s: %s", u.key, u.section, table.concat(u.known, ", "))
        end
        cfg_error(string.format("unknown key%s %s\n%s", #unknown > 1 and "s" or "", table.concat(names, ", "),
            table.concat(lines, "\n")))
    end
    check_types(path, value, schema)
end

M.check_section = check_section

-- Removed keys first, all of them in one message (a config using `optim:` uses several).
local function reject_removed(cfg)
    local found = {}
    if type(cfg.optim) == "table" then
        for _, k in ipairs(sorted_keys(cfg.optim)) do
            local key = "optim." .. k
            found[#found + 1] = string.format("'%s' -> '%s'", key, REMOVED[key] or ("optimizer." .. k))
        end
        if #found == 0 then found[1] = "'optim' -> 'optimizer'" end
    elseif cfg.optim ~= nil then
        found[1] = "'optim' -> 'optimizer'"
    end
    if type(cfg.step_scheduler) == "table" and cfg.step_scheduler.log_every ~= nil then
        found[#found + 1] = "'step_scheduler.log_every' -> 'step_scheduler.log_remote_every_steps'"
    end
    if #found > 0 then
        cfg_error("the config uses keys Automodel removed: " .. table.concat(found, "; ") .. ". The diffusion " ..
            "recipe uses the optimizer / clip_grad_norm / step_scheduler keys, for example:\n" ..
            "optimizer:\n  _target_: torch.optim.AdamW\n  lr: 2.0e-5\nclip_grad_norm:\n  max_norm: 1.0")
    end
end

-- ==== command line ====

-- Parse "--a.b.c value" / "--a.b.c=value" pairs and -c / --config FILE; values are YAML
-- (scalars, or flow lists and mappings: --optimizer.betas "[0.9, 0.95]").
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
        elseif a:match("^%-%-[%a_][%w_]*") then
            local key, val = a:match("^%-%-([^=]+)=(.*)$")
            if not key then
                key = a:sub(3)
                val = args[i + 1]
                if val == nil then cfg_error("option --" .. key .. " needs a value") end
                i = i + 2
            else
                i = i + 1
            end
            if not key:match("^[%a_][%w_]*[%w_%.]*$") or key:find("..", 1, true) or key:sub(-1) == "." then
                cfg_error("--" .. key .. ": expected --section.key (letters, digits, _ and dots)")
            end
            out.overrides[#out.overrides + 1] = {key = key, text = val}
        else
            cfg_error("unexpected argument '" .. a .. "' (expected -c FILE or --section.key value)")
        end
    end
    return out
end

-- Set cfg[a][b][c] = YAML value of text (a null value removes the key).
function M.apply_override(cfg, key, text)
    local ok, v = pcall(yaml.load, text, "--" .. key)
    if not ok then cfg_error(string.format("--%s: cannot read the value '%s': %s", key, tostring(text), tostring(v))) end
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

-- read_config(path, overrides) -> the YAML with the --section.key overrides applied and nulls
-- removed, not validated (recipes/generate.lua validates its own keys)
function M.read_config(path, overrides)
    local ok, cfg = pcall(yaml.load_file, path)
    if not ok then cfg_error(cfg) end
    cfg = cfg or {}
    if type(cfg) ~= "table" then cfg_error(path .. ": expected a mapping at the top level") end
    for _, o in ipairs(overrides or {}) do M.apply_override(cfg, o.key, o.text) end
    return strip_nulls(cfg)
end

-- load_config(path, overrides) -> the validated config table.
function M.load_config(path, overrides)
    local cfg = M.read_config(path, overrides)
    M.validate(cfg)
    return cfg
end

-- ==== validation ====

-- save_consolidated as Automodel reads it: true / "true" / "every" -> "every", "final",
-- false / "false" -> "false"; nil -> "final".
function M.consolidated_mode(v)
    if v == nil or v == yaml.null then return "final" end
    if v == true then return "every" end
    if v == false then return "false" end
    if type(v) == "string" then
        local s = v:lower():gsub("^%s+", ""):gsub("%s+$", "")
        if s == "true" or s == "every" then return "every" end
        if s == "final" or s == "false" then return s end
    end
    cfg_error(string.format("checkpoint.save_consolidated: '%s' is not one of false, final, every (or a boolean)",
        tostring(v)))
end

-- The world and this process's place in it (from the launcher's environment: mpirun, srun,
-- nemo-lua --nproc-per-node; see nemo.dist.env).
local function world()
    local e = dist.env()
    return e.world_size, e.rank
end

local function data_parallel_size(cfg)
    local ws = world()
    local block = cfg.fsdp or cfg.ddp
    local name = cfg.fsdp and "fsdp" or "ddp"
    local cpn, tpn = 1, 1
    if block then
        for _, k in ipairs { "pp_size", "ep_size" } do
            if block[k] and block[k] > 1 then
                cfg_error(string.format("%s.%s = %d: pipeline/expert parallelism is not supported yet", name, k,
                    block[k]))
            end
        end
        for _, k in ipairs { "cp_size", "tp_size" } do
            if block[k] and block[k] > 1 and cfg.ddp then
                cfg_error(string.format("ddp.%s = %d: %s parallelism runs under FSDP2 (an 'fsdp:' block), as in " ..
                    "Automodel", k, block[k], k == "cp_size" and "context" or "tensor"))
            end
        end
        cpn = block.cp_size and block.cp_size > 1 and block.cp_size or 1
        tpn = block.tp_size and block.tp_size > 1 and block.tp_size or 1
        for k, v in pairs { cp_size = cpn, tp_size = tpn } do
            if v % 1 ~= 0 or ws % v ~= 0 then
                cfg_error(string.format("fsdp.%s = %s must divide the world size %d", k, tostring(v), ws))
            end
        end
        if ws % (cpn * tpn) ~= 0 then
            cfg_error(string.format("fsdp.cp_size x fsdp.tp_size = %d must divide the world size %d", cpn * tpn, ws))
        end
    end
    local mp = cpn * tpn   -- the model-parallel ranks of one data-parallel rank
    if ws > 1 and not block then
        cfg_error(string.format("this run has %d processes but the config has no 'fsdp:' or 'ddp:' block: add one " ..
            "(e.g. 'fsdp:\n  dp_size: %d' or 'ddp:\n  dp_size: %d') to choose the data-parallel manager", ws, ws, ws))
    end
    if block then
        -- dp_size counts every data-parallel rank (HSDP's replicas included, as Automodel's mesh);
        -- the cp ranks of a data-parallel rank share its batch
        local dp = block.dp_size or ws / mp
        if dp * mp ~= ws then
            cfg_error(string.format("%s.dp_size = %d does not match the world size %d%s (this run has %d process%s; " ..
                "pass --%s.dp_size %d)", name, dp, ws, tpn == 1 and cpn > 1 and (" / cp_size " .. cpn) or
                cpn == 1 and tpn > 1 and (" / tp_size " .. tpn) or mp > 1 and (" / (cp_size x tp_size) " .. mp) or "", ws,
                ws == 1 and "" or "es", name, ws / mp))
        end
        local rep = block.dp_replicate_size or 1
        if rep > 1 and (dp % rep ~= 0 or rep >= dp) then
            cfg_error(string.format("%s.dp_replicate_size = %d must divide dp_size = %d and be smaller than it " ..
                "(HSDP shards over dp_size / dp_replicate_size ranks)", name, rep, dp))
        end
    end
    -- pp = 1: the mesh is (dp_replicate, dp_shard, cp, tp) with tp fastest, so the cp x tp ranks
    -- of data-parallel rank d are d x mp .. d x mp + mp - 1, and they share its batch
    local _, rank = world()
    return ws / mp, math.floor(rank / mp), cpn, tpn
end

-- batch_math(cfg) -> {local_bs, global_bs, dp_size, grad_acc}: global = local x dp x grad_acc exactly.
function M.batch_math(cfg)
    local ss = cfg.step_scheduler
    local dp_size, dp_rank, cp_size, tp_size = data_parallel_size(cfg)
    local local_bs = ss.local_batch_size or 1
    local global_bs = ss.global_batch_size or local_bs * dp_size
    if global_bs % (local_bs * dp_size) ~= 0 then
        local unit = local_bs * dp_size
        local lo = math.max(1, math.floor(global_bs / unit)) * unit
        local hi = math.ceil(global_bs / unit) * unit
        local fixes = {string.format("global_batch_size %d", lo)}
        if hi ~= lo then fixes[#fixes + 1] = string.format("global_batch_size %d", hi) end
        if global_bs % dp_size == 0 and global_bs / dp_size < local_bs then
            fixes[#fixes + 1] = string.format("local_batch_size %d", global_bs / dp_size)
        end
        cfg_error(string.format("step_scheduler.global_batch_size (%d) must be a multiple of local_batch_size (%d) " ..
            "x data-parallel size (%d) = %d: gradient accumulation is global / (local x dp) micro-batches per step " ..
            "(e.g. %s)", global_bs, local_bs, dp_size, unit, table.concat(fixes, " or ")))
    end
    return {local_bs = local_bs, global_bs = global_bs, dp_size = dp_size, dp_rank = dp_rank, cp_size = cp_size,
            tp_size = tp_size,
            grad_acc = global_bs / (local_bs * dp_size)}
end

-- The demo's model: "flux" (the default) or "wan"; nil without a demo block.
local DEMO_MODELS = {flux = {module = "nemo.models.flux", class = "FluxTransformer2DModel"},
                     wan = {module = "nemo.models.wan", class = "WanTransformer3DModel"}}
local function demo_kind(cfg)
    local d = cfg.demo
    if type(d) ~= "table" then return nil end
    local kind = d.model == nil and "flux" or d.model
    if not DEMO_MODELS[kind] then
        cfg_error(string.format("demo.model must be 'flux' or 'wan', got '%s'", tostring(kind)))
    end
    return kind
end

-- SCHEMA with demo.transformer's keys: the config fields of the demo model's transformer class
-- (a misspelt key is an error here, on every run, not a warning when the assets are first made).
local function schema_for(cfg)
    local kind = demo_kind(cfg)
    if not kind then return SCHEMA end
    local fields = {}
    for _, f in ipairs(require(DEMO_MODELS[kind].module).CONFIG_FIELDS) do fields[f[1]] = ANY end
    local demo, s = {}, {}
    for k, v in pairs(SCHEMA.demo) do demo[k] = v end
    demo.transformer = fields
    for k, v in pairs(SCHEMA) do s[k] = v end
    s.demo = demo
    return s
end

-- The floating-point dtypes a model can be stored or computed in, with the engine's aliases.
local DTYPES_TEXT = "float32, bfloat16, float16 or float64 (aliases: fp32, float, bf16, fp16, half, fp64, " ..
    "double; a 'torch.' prefix is allowed)"
local FLOAT_DTYPES = {float32 = true, bfloat16 = true, float16 = true, float64 = true}

-- dtype_name(value, key) -> the canonical name ("bf16" -> "bfloat16"), nil for nil; anything else
-- is an error naming the key and the accepted names.
function M.dtype_name(v, key)
    if v == nil or v == yaml.null then return nil end
    local name
    if type(v) == "string" then
        local id = nffi.C.nemo_dtype_from_name(v)
        name = id >= 0 and require("nemo.tensor").dtype_names[id] or nil
    end
    if not FLOAT_DTYPES[name] then
        cfg_error(string.format("%s: %s: use %s", key, v == "auto" and "'auto' is not supported (the trainer " ..
            "decides mixed precision before the model loads)" or string.format("unknown dtype '%s'", tostring(v)),
            DTYPES_TEXT))
    end
    return name
end

local DIST_BACKENDS = {"nccl", "mpi", "gloo"}

-- step_scheduler.preemption_signal -> a list of signal numbers (Automodel's StepScheduler: SIGTERM
-- when unset; a name such as "SIGTERM" / "TERM", a number, or a list of them; false or "none"
-- watches nothing). On one of them the run ends after the current step with a checkpoint.
local SIGNALS = {HUP = 1, INT = 2, QUIT = 3, USR1 = 10, USR2 = 12, ALRM = 14, TERM = 15, XCPU = 24}
M.SIGNALS = SIGNALS
function M.preemption_signals(v)
    if v == nil then return {SIGNALS.TERM} end
    if v == false or (type(v) == "string" and v:lower() == "none") then return {} end
    local list = type(v) == "table" and v or {v}
    local out = {}
    for _, x in ipairs(list) do
        local n
        if type(x) == "number" and x % 1 == 0 and x > 0 and x < 65 and x ~= 9 and x ~= 19 then n = x
        elseif type(x) == "string" then n = SIGNALS[x:upper():gsub("^SIG", "")] end
        if not n then
            local names = {}
            for k in pairs(SIGNALS) do names[#names + 1] = "SIG" .. k end
            table.sort(names)
            cfg_error(string.format("step_scheduler.preemption_signal: %s is not a signal to end on gracefully " ..
                "(a name: %s; a number; a list; or false for none)", tostring(x), table.concat(names, ", ")))
        end
        out[#out + 1] = n
    end
    return out
end
local function signal_name(n)
    for k, v in pairs(SIGNALS) do if v == n then return "SIG" .. k end end
    return "signal " .. n
end

function M.validate(cfg)
    if type(cfg) ~= "table" then cfg_error("expected a mapping, got " .. type(cfg)) end
    reject_removed(cfg)
    check_section("", cfg, schema_for(cfg))
    local kind = demo_kind(cfg)
    if kind and cfg.demo.transformer ~= nil then   -- the values too (types, ranges), before any demo lookup
        local dm = DEMO_MODELS[kind]
        local ok, err = pcall(require(dm.module).resolve_config, cfg.demo.transformer, "demo.transformer (" ..
            dm.class .. ")")
        if not ok then cfg_error(err) end
    end
    local examples = {
        optimizer = "optimizer:\n  _target_: torch.optim.AdamW\n  lr: 1.0e-4",
        checkpoint = "checkpoint:\n  enabled: true\n  checkpoint_dir: runs/my_run",
        data = "data:\n  dataloader:\n    _target_: nemo.data.build_dataloader\n    cache_dir: /path/to/cache",
        model = "model:\n  pretrained_model_name_or_path: black-forest-labs/FLUX.1-dev\n  mode: finetune",
        step_scheduler = "step_scheduler:\n  global_batch_size: 8\n  local_batch_size: 1\n  max_steps: 1000",
    }
    for _, req in ipairs { "model", "optimizer", "step_scheduler", "data", "checkpoint" } do
        if cfg[req] == nil then
            cfg_error(string.format("the '%s' section is required, for example:\n%s", req, examples[req]))
        end
    end
    if cfg.fsdp and cfg.ddp then cfg_error("'fsdp' and 'ddp' are mutually exclusive: keep one") end
    if cfg.peft then   -- LoRA (nemo.peft): Automodel's rules
        local ok, err = pcall(require("nemo.peft").PeftConfig, cfg.peft)
        if not ok then cfg_error(err) end
        if (cfg.model.mode or "finetune") ~= "finetune" then
            cfg_error("peft: LoRA adapts a pretrained model: it needs model.mode finetune (a pretraining run trains " ..
                "every weight; remove the peft block)")
        end
        local mt = cfg.model.model_type
        if mt == nil then
            cfg_error("model.model_type must be set when a peft block is given ('flux' or 'wan'), as Automodel requires")
        end
        if not PEFT_MODEL_TYPES[mt] then
            cfg_error(string.format("model.model_type '%s' is not one nemo-lua trains (known: %s)", tostring(mt),
                table.concat(sorted_keys(PEFT_MODEL_TYPES), ", ")))
        end
    end
    local stage = cfg.model.stage
    if stage ~= nil and stage ~= json.null then   -- Wan 2.2: one expert per run
        if stage ~= "high_noise" and stage ~= "low_noise" then
            cfg_error("model.stage must be high_noise or low_noise (Wan 2.2's two experts), got " .. tostring(stage))
        end
        local br = cfg.model.boundary_ratio
        if br ~= nil and br ~= json.null and (type(br) ~= "number" or not (br > 0 and br < 1)) then
            cfg_error("model.boundary_ratio must be a number in (0, 1), got " .. tostring(br))
        end
    end
    if cfg.seed ~= nil and cfg.seed % 1 ~= 0 then cfg_error("seed must be an integer, got " .. tostring(cfg.seed)) end
    local t = cfg.optimizer._target_
    if t and not OPTIMIZER_TARGETS[t] then
        cfg_error(string.format("optimizer._target_ '%s' is not supported (known: %s)", t,
            table.concat(sorted_keys(OPTIMIZER_TARGETS), ", ")))
    end
    if cfg.optimizer.lr == nil then cfg_error("optimizer.lr is required, for example:\n" .. examples.optimizer) end
    if cfg.optimizer.lr < 0 then cfg_error("optimizer.lr must be >= 0, got " .. tostring(cfg.optimizer.lr)) end
    local dl = cfg.data.dataloader
    if type(dl) ~= "table" then cfg_error("data.dataloader is required, for example:\n" .. examples.data) end
    if dl._target_ and not DATALOADER_TARGETS[dl._target_] then
        cfg_error(string.format("data.dataloader._target_ '%s' is not supported (known: %s)", dl._target_,
            table.concat(sorted_keys(DATALOADER_TARGETS), ", ")))
    end
    local mode = cfg.model.mode or "finetune"
    if mode ~= "finetune" and mode ~= "pretrain" then
        cfg_error("model.mode must be 'finetune' or 'pretrain', got '" .. tostring(mode) .. "'")
    end
    -- the dtype names first, then what they mean together
    local torch_dtype = M.dtype_name(cfg.model.torch_dtype, "model.torch_dtype") or "bfloat16"
    local compute_dtype = M.dtype_name(cfg.model.compute_dtype, "model.compute_dtype") or torch_dtype
    if cfg.fsdp then M.dtype_name(cfg.fsdp.reduce_dtype, "fsdp.reduce_dtype") end
    if compute_dtype ~= torch_dtype and cfg.peft then
        cfg_error(string.format("model.torch_dtype (%s) and model.compute_dtype (%s) must match for PEFT/LoRA " ..
            "(Automodel's rule: split storage and compute dtypes need FSDP full-parameter training)", torch_dtype,
            compute_dtype))
    end
    if compute_dtype ~= torch_dtype and not cfg.fsdp then
        cfg_error(string.format("model.compute_dtype (%s) differs from model.torch_dtype (%s): mixed precision " ..
            "(%s master weights, %s compute) runs through the FSDP2 manager's mp_policy; add an 'fsdp:' block " ..
            "(it works on one process too: --fsdp.dp_size 1), or set them equal (Automodel refuses this for DDP as well)",
            compute_dtype, torch_dtype, torch_dtype, compute_dtype))
    end
    local de = cfg.dist_env
    if de and de.backend ~= nil then
        local known = false
        for _, b in ipairs(DIST_BACKENDS) do known = known or de.backend == b end
        if not known then
            cfg_error(string.format("dist_env.backend '%s' is not one of %s (nccl: between GPUs, Automodel's default; " ..
                "mpi or gloo: between CPU processes, both run over MPI)", tostring(de.backend),
                table.concat(DIST_BACKENDS, ", ")))
        end
    end
    if de and de.timeout_minutes ~= nil and not (de.timeout_minutes > 0) then
        cfg_error("dist_env.timeout_minutes must be > 0, got " .. tostring(de.timeout_minutes))
    end
    if cfg.wandb and cfg.wandb.enable then
        cfg_error("wandb.enable: Weights & Biases logging is not available in nemo-lua; metrics go to " ..
            "<checkpoint_dir>/metrics.jsonl. Set wandb.enable: false")
    end
    local ss = cfg.step_scheduler
    for _, k in ipairs { "local_batch_size", "global_batch_size", "ckpt_every_steps", "log_remote_every_steps",
                         "max_steps", "num_epochs" } do
        local v = ss[k]
        if v ~= nil and not is_posint(v) then
            cfg_error(string.format("step_scheduler.%s must be a positive integer, got %s", k, tostring(v)))
        end
    end
    local ck = cfg.checkpoint
    M.consolidated_mode(ck.save_consolidated)
    if ck.max_recent_checkpoints ~= nil and not is_posint(ck.max_recent_checkpoints) then
        cfg_error("checkpoint.max_recent_checkpoints must be unset or a positive integer, got " ..
            tostring(ck.max_recent_checkpoints))
    end
    local fmt = ck.model_save_format
    if fmt ~= nil and fmt ~= "safetensors" and fmt ~= "torch_save" then
        cfg_error("checkpoint.model_save_format must be 'safetensors' or 'torch_save', got '" .. tostring(fmt) .. "'")
    end
    if ck.restore_from ~= nil and type(ck.restore_from) ~= "string" then
        cfg_error("checkpoint.restore_from must be a checkpoint name or path, got " .. tostring(ck.restore_from))
    end
    local dev = cfg.device
    if dev ~= nil and dev ~= "auto" and dev ~= "cpu" and not dev:match("^cuda$") and not dev:match("^cuda:%d+$") then
        cfg_error("device must be auto, cpu, cuda or cuda:N, got '" .. dev .. "'")
    end
    local mn = cfg.clip_grad_norm and cfg.clip_grad_norm.max_norm
    if mn ~= nil and not (mn > 0) then cfg_error("clip_grad_norm.max_norm must be > 0, got " .. tostring(mn)) end
    local lg = cfg.logging
    if lg and lg.log_every ~= nil and not is_posint(lg.log_every) then
        cfg_error("logging.log_every must be a positive integer, got " .. tostring(lg.log_every))
    end
    M.preemption_signals(ss.preemption_signal)
    for _, k in ipairs { "val_every_steps", "loss_average_window_steps" } do
        if ss[k] ~= nil and not is_posint(ss[k]) then
            cfg_error(string.format("step_scheduler.%s must be a positive integer, got %s", k, tostring(ss[k])))
        end
    end
    local vc = cfg.validation
    if vc and vc.enabled ~= false then
        if vc.holdout ~= nil and vc.cache_dir ~= nil then
            cfg_error("validation: give cache_dir (a validation cache) or holdout (samples of the training cache), not both")
        end
        if vc.holdout ~= nil and demo_kind(cfg) == nil and DATALOADER_TARGETS[cfg.data.dataloader._target_ or
            "nemo.data.build_dataloader"] == "mock" then
            cfg_error("validation.holdout needs a latent cache (data.dataloader.cache_dir), not the mock dataloader")
        end
        for _, k in ipairs { "every_steps", "num_sigmas", "max_samples", "batch_size", "holdout" } do
            if vc[k] ~= nil and not is_posint(vc[k]) then
                cfg_error(string.format("validation.%s must be a positive integer, got %s", k, tostring(vc[k])))
            end
        end
        if vc.seed ~= nil and not (vc.seed >= 0 and vc.seed % 1 == 0) then
            cfg_error("validation.seed must be a non-negative integer, got " .. tostring(vc.seed))
        end
        if vc.ema and not (cfg.ema and cfg.ema.enabled ~= false) then
            cfg_error("validation.ema: true needs an ema: block (the averages to validate)")
        end
    end
    M.batch_math(cfg)
    return cfg
end

-- ==== the demo assets ====

local function expand_home(p)
    if p:sub(1, 2) == "~/" then return (os.getenv("HOME") or ".") .. p:sub(2) end
    return p
end

-- the folder of the demo assets (demo.dir, else $XDG_CACHE_HOME/nemo-lua/demo)
local function demo_root(d)
    if d.dir then return expand_home(d.dir) end
    local cache = os.getenv("XDG_CACHE_HOME")
    if not cache or cache == "" then cache = (os.getenv("HOME") or ".") .. "/.cache" end
    return cache .. "/nemo-lua/demo"
end
M.demo_root = demo_root

-- The demo's folder: a hash of everything the assets are made from (so a change makes new ones).
function M.demo_paths(cfg)
    local d = cfg.demo
    local tcfg = d.transformer or {}
    local key = json.encode(tcfg) .. "|" .. tostring(d.samples) .. "|" .. tostring(d.resolutions) .. "|" ..
        tostring(d.text_len) .. "|" .. tostring(cfg.seed or 42)
    local h = 0
    for i = 1, #key do h = (h * 31 + key:byte(i)) % 2147483647 end
    local base = string.format("%s/flux-%08x", demo_root(d), h)
    return base .. "/pipeline", base .. "/cache", base
end

-- The demo pipeline's VAE (random weights, tiny) and scheduler (FLUX.1-dev's / Wan 2.1's config),
-- so that validation.sampling works on the demo: added to model_dir (its model_index.json too)
-- when missing, each part written under a temporary name and renamed.
local function demo_sampling_parts(model_dir, kind, C, seed, log)
    local index = json.read_file(model_dir .. "/model_index.json")
    if type(index.vae) == "table" and index.vae[1] ~= json.null and type(index.scheduler) == "table" and
       index.scheduler[1] ~= json.null then
        return
    end
    log(string.format("demo: adding a small VAE and the scheduler to %s (once)", model_dir))
    nemo.manual_seed(seed)
    local vae, vae_cls, sched, sched_cls
    if kind == "flux" then
        local blocks = {"DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"}
        vae_cls, sched_cls = "AutoencoderKL", "FlowMatchEulerDiscreteScheduler"
        vae = require("nemo.models.vae").AutoencoderKL {in_channels = 3, out_channels = 3, latent_channels = C,
            block_out_channels = {8, 8, 8, 8}, down_block_types = blocks,
            up_block_types = {"UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"},
            layers_per_block = 1, norm_num_groups = 2, act_fn = "silu", sample_size = 128, scaling_factor = 0.3611,
            shift_factor = 0.1159, use_quant_conv = false, use_post_quant_conv = false}
        sched = require("nemo.schedulers.flow_match_euler").FlowMatchEulerDiscreteScheduler.from_config {
            base_image_seq_len = 256, base_shift = 0.5, max_image_seq_len = 4096, max_shift = 1.15,
            num_train_timesteps = 1000, shift = 3.0, use_dynamic_shifting = true}
    else
        local mean, std = {}, {}
        for i = 1, C do mean[i], std[i] = 0, 1 end
        vae_cls, sched_cls = "AutoencoderKLWan", "UniPCMultistepScheduler"
        vae = require("nemo.models.wan_vae").AutoencoderKLWan {base_dim = 8, z_dim = C, dim_mult = {1, 2, 2, 2},
            num_res_blocks = 1, temperal_downsample = {false, true, true}, latents_mean = mean, latents_std = std}
        sched = require("nemo.schedulers.unipc").UniPCMultistepScheduler.from_config {flow_shift = 3.0,
            prediction_type = "flow_prediction", use_flow_sigmas = true, num_train_timesteps = 1000, solver_order = 2}
    end
    for name, part in pairs {vae = vae, scheduler = sched} do
        local dir = model_dir .. "/" .. name
        if fs.exists(dir .. ".tmp") then fs.remove_tree(dir .. ".tmp") end
        if fs.exists(dir) then fs.remove_tree(dir) end
        part:save_pretrained(dir .. ".tmp")
        fs.rename(dir .. ".tmp", dir)
    end
    index.vae = {"diffusers", vae_cls}
    index.scheduler = {"diffusers", sched_cls}
    json.write_file(model_dir .. "/model_index.json.tmp", index, {indent = 2})
    fs.rename(model_dir .. "/model_index.json.tmp", model_dir .. "/model_index.json")
end

local function ensure_demo(cfg, log)
    local d = cfg.demo
    local tcfg = d.transformer or {}
    local kind = d.model or "flux"
    if kind == "wan" then   -- a small Wan pipeline and video-latent cache (nemo.models.wan)
        local model_dir, cache_dir = require("nemo.models.wan").demo_assets{root = d.dir and expand_home(d.dir) or nil,
            transformer = tcfg, samples = d.samples, resolutions = d.resolutions, text_len = d.text_len,
            seed = cfg.seed, log = log}
        demo_sampling_parts(model_dir, "wan", require("nemo.models.wan").resolve_config(tcfg, "demo").in_channels,
            cfg.seed or 42, log)
        cfg.model.pretrained_model_name_or_path = model_dir
        cfg.data.dataloader.cache_dir = cache_dir
        return
    end
    local model_dir, cache_dir, base = M.demo_paths(cfg)
    if not fs.isfile(model_dir .. "/model_index.json") then
        log(string.format("demo: creating a small FLUX-architecture pipeline in %s (once)", model_dir))
        -- from_config on a config folder, then save_pretrained: a pipeline folder as diffusers writes it
        local src = base .. "/config"
        fs.mkdirs(src .. "/transformer")
        local c = {_class_name = "FluxTransformer2DModel"}
        for k, v in pairs(tcfg) do c[k] = v end
        json.write_file(src .. "/transformer/config.json", c)
        nemo.manual_seed(cfg.seed or 42)
        local pipe = pipeline.NeMoAutoDiffusionPipeline.from_config(src, {transformer_cls = "FluxTransformer2DModel"},
            {torch_dtype = "float32", device = "cpu", enable_gradient_checkpointing = false})
        pipe:save_pretrained(model_dir)
    end
    demo_sampling_parts(model_dir, "flux", math.floor((tcfg.in_channels or 64) / 4), cfg.seed or 42, log)
    if not fs.isfile(cache_dir .. "/index.json") then
        log(string.format("demo: writing a synthetic latent cache in %s (once)", cache_dir))
        require("nemo.data.synthetic").make {
            out = cache_dir, samples = d.samples or 256, model = "flux", resolutions = d.resolutions or "16x16",
            seed = cfg.seed or 42, text_len = d.text_len or 8, force = true,
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
    is_tty = ffi.C.isatty(1) == 1 and os.getenv("TERM") ~= "dumb"
end)

local now = os.clock
pcall(function()
    ffi.cdef [[ typedef struct { long tv_sec; long tv_nsec; } nemo_train_ts; int clock_gettime(int, nemo_train_ts *); ]]
    local ts = ffi.new("nemo_train_ts")
    now = function() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9 end
end)

-- "0m07s", "12m30s", "2h05m"; "?" when unknown.
function M.format_time(s)
    if type(s) ~= "number" or s ~= s or s == math.huge or s < 0 then return "?" end
    s = math.floor(s + 0.5)
    if s >= 3600 then return string.format("%dh%02dm", math.floor(s / 3600), math.floor(s % 3600 / 60)) end
    return string.format("%dm%02ds", math.floor(s / 60), s % 60)
end

-- The progress bar (one terminal line): p = {done =, total =, loss =, lr =, sec_per_step =, eta =,
-- width = 24}.
function M.format_progress(p)
    local width = p.width or 24
    local fill = math.max(0, math.min(width, math.floor(width * p.done / p.total)))
    return string.format("[%s%s] %d/%d  loss %.4f  lr %.2e  %.3f s/step  ETA %s", string.rep("#", fill),
        string.rep(".", width - fill), p.done, p.total, p.loss, p.lr, p.sec_per_step, M.format_time(p.eta))
end

-- A plain log line (when stdout is not a terminal): p = {step =, total =, epoch =, loss =, lr =,
-- grad_norm =, sec_per_step =, eta =}; step is the 0-based index of the step just taken.
function M.format_log_line(p)
    return string.format("step %d/%d epoch %d loss %.6f lr %.3e grad_norm %.4f %.3f s/step ETA %s", p.step, p.total,
        p.epoch, p.loss, p.lr, p.grad_norm, p.sec_per_step, M.format_time(p.eta))
end

-- ==== data and model checks ====

local function build_data(cfg, bm, dp_rank, seed, device)
    local dl = cfg.data.dataloader
    local kind = DATALOADER_TARGETS[dl._target_ or "nemo.data.build_dataloader"]
    local data = require "nemo.data"
    if kind == "mock" then
        local ok, loader = pcall(data.MockDataLoader, {batch_size = bm.local_bs, latent_shape = dl.latent_shape or {16, 32, 32},
            text_len = dl.text_len or 64, text_dim = dl.text_dim or 4096, pooled_dim = dl.pooled_dim or 768,
            seed = seed, length = dl.length or 1024, device = device, dp_rank = dp_rank, dp_size = bm.dp_size})
        if not ok then cfg_error("data.dataloader (mock): " .. strip_pos(loader)) end
        return loader
    end
    local dir = dl.cache_dir
    if not dir or dir == "PATH_TO_YOUR_DATA" then
        cfg_error("data.dataloader.cache_dir is required: a latent cache folder (docs/data.md; " ..
            "tools/make_synthetic_cache.lua writes a synthetic one), e.g. --data.dataloader.cache_dir /path/to/cache")
    end
    if not fs.isdir(dir) then
        cfg_error("data.dataloader.cache_dir: no folder at '" .. dir .. "'" ..
            (fs.exists(dir) and " (it is a file; a latent cache is a folder holding index.json and shards)" or ""))
    end
    local vc = cfg.validation
    local holdout = vc and vc.enabled ~= false and vc.holdout
    if not holdout then
        local ok, loader = pcall(data.build_dataloader, {cache_dir = dir, model_type = dl.model_type,
            batch_size = bm.local_bs, seed = seed, shuffle = dl.shuffle ~= false, drop_last = dl.drop_last ~= false,
            dp_rank = dp_rank, dp_size = bm.dp_size, device = device, pin_memory = dl.pin_memory,
            dynamic_batch_size = dl.dynamic_batch_size, base_resolution = dl.base_resolution})
        if not ok then raise("data.dataloader.cache_dir: ", loader) end
        return loader
    end
    -- validation.holdout: samples of the training cache set aside (validation.seed picks them)
    local ok, ds = pcall(data.Dataset, dir, {model_type = dl.model_type})
    if not ok then raise("data.dataloader.cache_dir: ", ds) end
    local hok, held, rest = pcall(ds.holdout, ds, holdout, vc.seed or 0)
    if not hok then cfg_error("validation." .. strip_pos(held)) end
    local lok, loader = pcall(data.DataLoader, rest, {batch_size = bm.local_bs, seed = seed,
        shuffle = dl.shuffle ~= false, drop_last = dl.drop_last ~= false, dp_rank = dp_rank, dp_size = bm.dp_size,
        device = device, pin_memory = dl.pin_memory, dynamic_batch_size = dl.dynamic_batch_size,
        base_resolution = dl.base_resolution})
    if not lok then raise("data.dataloader.cache_dir (without the validation.holdout samples): ", loader) end
    return loader, held
end

local function class_name(model) return (tostring(model.__name or "?"):match("([^%.]+)$")) end

-- The data must fit the model: a clear error before training, not a shape error inside a matmul.
local function check_data_fits(model, loader, fm, where)
    local mc = rawget(model, "config") or {}
    local cls = class_name(model)
    local ds = loader.dataset
    local C, text_dim, pooled_dim, data_type, dims
    if ds then
        C, text_dim, pooled_dim, data_type = ds.latent_channels, ds.text_dim, ds.pooled_dim, ds.data_type
        dims = {}
        for _, b in ipairs(ds.buckets) do dims[#dims + 1] = b.dims end
    else
        C, text_dim, pooled_dim, data_type = loader.latent_shape[1], loader.text_dim, loader.pooled_dim, loader.data_type
        local d = {}
        for i = 2, #loader.latent_shape do d[#d + 1] = loader.latent_shape[i] end
        dims = {d}
    end
    local function bad(msg) error(string.format("data does not fit the model: %s (data: %s; model: %s)", msg, where,
        cls), 0) end
    if cls == "FluxTransformer2DModel" then
        if fm.adapter_type ~= "flux" then
            cfg_error(string.format("flow_matching.adapter_type is '%s' but the model is a FluxTransformer2DModel: " ..
                "set flow_matching.adapter_type: flux", fm.adapter_type))
        end
        if data_type ~= "image" then bad("FLUX trains on image latents [C, H, W], the cache holds " .. tostring(data_type) .. " latents") end
        if mc.in_channels and C * 4 ~= mc.in_channels then
            bad(string.format("the latents have %d channels, packed 2x2 that is %d features per token, but the " ..
                "model's in_channels is %d (it takes %d-channel latents)", C, C * 4, mc.in_channels, mc.in_channels / 4))
        end
        for _, d in ipairs(dims) do
            if d[1] % 2 ~= 0 or d[2] % 2 ~= 0 then
                bad(string.format("latent size %dx%d is not even (FLUX packs 2x2 patches)", d[1], d[2]))
            end
        end
        if mc.joint_attention_dim and text_dim and text_dim ~= mc.joint_attention_dim then
            bad(string.format("the text embeddings are %d wide, the model's joint_attention_dim is %d", text_dim,
                mc.joint_attention_dim))
        end
        local P = (pooled_dim and pooled_dim > 0) and pooled_dim or 768
        if mc.pooled_projection_dim and P ~= mc.pooled_projection_dim then
            bad(string.format("the pooled embeddings are %d wide%s, the model's pooled_projection_dim is %d", P,
                (pooled_dim and pooled_dim > 0) and "" or " (none cached: zeros of width 768)", mc.pooled_projection_dim))
        end
    elseif mc.in_channels then
        if mc.in_channels ~= C then
            bad(string.format("the latents have %d channels, the model's in_channels is %d", C, mc.in_channels))
        end
        if mc.text_dim and text_dim and mc.text_dim ~= text_dim then
            bad(string.format("the text embeddings are %d wide, the model's text_dim is %d", text_dim, mc.text_dim))
        end
    end
end

-- The model's identity for the resume check: class name + config, without "_" keys and nulls.
local function model_signature(model)
    local cfg = {}
    for k, v in pairs(rawget(model, "config") or {}) do cfg[k] = v end
    cfg._class_name = class_name(model)
    return cfg
end

local function normalize_sig(s)
    local out = {}
    for k, v in pairs(s or {}) do
        if v ~= json.null and v ~= yaml.null and (k == "_class_name" or k:sub(1, 1) ~= "_") then out[k] = v end
    end
    return out
end

-- nil when equal, else a description of the differences.
local function signature_diff(saved, mine)
    local a, b = normalize_sig(saved), normalize_sig(mine)
    local keys, seen = {}, {}
    for k in pairs(a) do keys[#keys + 1] = k; seen[k] = true end
    for k in pairs(b) do if not seen[k] then keys[#keys + 1] = k end end
    table.sort(keys)
    local diffs = {}
    for _, k in ipairs(keys) do
        local x, y = json.encode(a[k]), json.encode(b[k])
        if x ~= y then diffs[#diffs + 1] = string.format("%s = %s there, %s here", k, x, y) end
    end
    if #diffs == 0 then return nil end
    return table.concat(diffs, "; ")
end

-- The first parameter holding a NaN or an infinity (its name), or nil.
-- The name of the first non-finite trainable parameter ({{name, tensor}...}: the optimizer's, so
-- this rank's shards under FSDP2), decided on every rank together.
local function nonfinite_parameter(named)
    local bad
    local ts = {}
    for i, e in ipairs(named) do ts[i] = e[2] end
    for i, v in ipairs(require("nemo.optim").sum_squares(ts)) do
        if v ~= v or v == math.huge then bad = named[i][1]; break end
    end
    if dist.is_initialized() and dist.get_world_size() > 1 then
        local any = dist.all_reduce_number(bad and 1 or 0, "max")
        if any > 0 and not bad then bad = "(on another rank)" end
    end
    return bad
end

local function block_given(cfg) return cfg.fsdp ~= nil or cfg.ddp ~= nil end

-- Keep the lines of metrics.jsonl whose step is below `step` (a resumed run rewrites the rest).
local function truncate_metrics(path, step)
    if not fs.isfile(path) then return end
    local keep, dropped = {}, 0
    for line in io.lines(path) do
        local s = tonumber(line:match('"step":%s*(%-?%d+)'))
        if s and s < step then keep[#keep + 1] = line else dropped = dropped + 1 end
    end
    if dropped == 0 then return end
    local tmp = path .. ".tmp"
    local f = assert(io.open(tmp, "wb"))
    for _, line in ipairs(keep) do f:write(line, "\n") end
    f:close()
    fs.rename(tmp, path)
end

-- ==== the run ====

-- The validation.sampling block -> a nemo.validation.Sampler (o: cfg, vcfg, model, val_ds,
-- train_ds, device, dtype, writer, out_dir, stage). Loads the pipeline's VAE and scheduler, and
-- with prompts its tokenizers and text encoders, which encode the prompts once and are dropped.
function M._build_sampler(o)
    local sc, model = o.vcfg.sampling, o.model
    local V = require "nemo.validation"
    local sampling = require "nemo.sampling"
    local cls = class_name(model)
    local kind = cls == "FluxTransformer2DModel" and "image" or cls == "WanTransformer3DModel" and "video" or nil
    if not kind then error("samples are made for FLUX and Wan transformers, not a " .. cls, 0) end
    local mc = rawget(model, "config") or {}
    if kind == "video" and mc.image_dim ~= nil and mc.image_dim ~= json.null then
        error("samples of an image-to-video model are not supported yet (they need an input image per prompt)", 0)
    end
    if o.stage then
        error("samples of one Wan 2.2 expert (model.stage) are not supported: sampling needs both experts", 0)
    end
    for _, k in ipairs { "num_samples", "num_inference_steps", "height", "width", "num_frames", "fps" } do
        if sc[k] ~= nil and not is_posint(sc[k]) then error(k .. " must be a positive integer, got " .. tostring(sc[k]), 0) end
    end
    if sc.seed ~= nil and not (sc.seed >= 0 and sc.seed % 1 == 0) then
        error("seed must be a non-negative integer, got " .. tostring(sc.seed), 0)
    end
    if sc.prompts and sc.num_samples then error("give prompts or num_samples, not both", 0) end
    if not sc.prompts and not sc.num_samples then
        error("give num_samples (the first validation samples' cached embeddings) or prompts (encoded once)", 0)
    end
    if sc.prompts then
        if #sc.prompts == 0 then error("prompts must be a non-empty list of strings", 0) end
        for i, p in ipairs(sc.prompts) do
            if type(p) ~= "string" then error(string.format("prompts[%d] must be a string, got %s", i, type(p)), 0) end
        end
    end
    if sc.num_samples and not o.val_ds then
        error("num_samples needs validation.cache_dir or validation.holdout (their embeddings)", 0)
    end
    local gs = sc.guidance_scale or (kind == "image" and sampling.FLUX_DEFAULTS.guidance_scale or
        sampling.WAN_DEFAULTS.guidance_scale)
    local cfg_on = kind == "video" and gs > 1
    -- the components: VAE and scheduler, and the text side when prompts (or Wan's negative prompt) need it
    local path = o.cfg.model.pretrained_model_name_or_path
    local want = {"vae", "scheduler"}
    local text = sc.prompts ~= nil or cfg_on
    if text then
        for _, k in ipairs(kind == "image" and {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"} or
                           {"tokenizer", "text_encoder"}) do want[#want + 1] = k end
    end
    local pok, pipe = pcall(pipeline.NeMoAutoDiffusionPipeline.from_pretrained, path,
        {torch_dtype = o.dtype, device = o.device, components_to_load = want, enable_gradient_checkpointing = false})
    if not pok then
        error(string.format("the pipeline %s cannot give the %s samples need (%s)%s", path, table.concat(want, ", "),
            strip_pos(pipe), cfg_on and not sc.prompts and string.format("; Wan's guidance_scale %g needs the text " ..
            "encoder for the negative prompt: set validation.sampling.guidance_scale: 1 to sample without it", gs) or ""), 0)
    end
    local c = pipe.components
    for _, k in ipairs(want) do
        if not c[k] then error(string.format("the pipeline %s has no %s, which the samples need", path, k), 0) end
    end
    -- the prompts: {name, embeds [L, D], pooled [P], negative [L', D]}
    local prompts = {}
    if sc.prompts then
        if kind == "image" then
            local enc = sampling.flux_encode_prompt{prompt = sc.prompts, tokenizer = c.tokenizer,
                text_encoder = c.text_encoder, tokenizer_2 = c.tokenizer_2, text_encoder_2 = c.text_encoder_2}
            local pe, pooled = enc.prompt_embeds, enc.pooled_prompt_embeds
            for i, p in ipairs(sc.prompts) do
                prompts[i] = {name = p, embeds = pe:select(0, i - 1):clone(), pooled = pooled:select(0, i - 1):clone()}
            end
        else
            local pe = sampling.wan_encode_prompt{prompt = sc.prompts, tokenizer = c.tokenizer, text_encoder = c.text_encoder}
            for i, p in ipairs(sc.prompts) do prompts[i] = {name = p, embeds = pe:select(0, i - 1):clone()} end
        end
    else
        for i = 1, math.min(sc.num_samples, o.val_ds:len()) do
            local smp = o.val_ds:get(i)
            prompts[i] = {name = smp.caption or smp.id, embeds = smp.text_embeddings, pooled = smp.pooled}
        end
    end
    if cfg_on then
        local npe = sampling.wan_encode_prompt{prompt = {sc.negative_prompt or ""}, tokenizer = c.tokenizer,
            text_encoder = c.text_encoder}
        for _, p in ipairs(prompts) do p.negative = npe:select(0, 0):clone() end
    end
    -- the size: given, else the first validation (or training) sample's latents through the VAE
    local vae, pipe_scheduler = c.vae, c.scheduler
    local first = (o.val_ds and o.val_ds:len() > 0 and o.val_ds:get(1)) or (o.train_ds and o.train_ds:len() > 0 and
        o.train_ds:get(1)) or nil
    local lat = first and first.latents.shape
    local vcf = type(vae.config) == "table" and vae.config or {}
    local vsf = kind == "image" and sampling.flux_vae_scale_factor(vae) or (vcf.scale_factor_spatial or 8)
    local height = sc.height or (lat and lat[#lat - 1] * vsf)
    local width = sc.width or (lat and lat[#lat] * vsf)
    local nf = sc.num_frames or (kind == "video" and lat and (lat[2] - 1) * (vcf.scale_factor_temporal or 4) + 1) or nil
    if not height or not width or (kind == "video" and not nf) then
        error("set height and width" .. (kind == "video" and " and num_frames" or "") .. ": there is no cached " ..
            "sample to take them from", 0)
    end
    pipe, c = nil, nil
    collectgarbage()   -- the text encoders go (the prompts' embeddings are kept)
    return V.Sampler {kind = kind, prompts = prompts, vae = vae, scheduler = pipe_scheduler, height = height, width = width,
        num_frames = nf, num_inference_steps = sc.num_inference_steps or (kind == "image" and 28 or 50),
        guidance_scale = gs, seed = sc.seed or 0, output_dir = sc.output_dir or o.out_dir, fps = sc.fps or 16,
        writer = o.writer, device = o.device, dtype = o.dtype}
end

local function build_optimizer(cfg, params)
    local o = cfg.optimizer
    local ok, opt = pcall(nemo.optim.AdamW, params, {lr = o.lr, betas = o.betas or {0.9, 0.999}, eps = o.eps or 1e-8,
        weight_decay = o.weight_decay or 0.01, amsgrad = o.amsgrad, maximize = o.maximize})
    if not ok then cfg_error("optimizer: " .. strip_pos(opt)) end
    return opt
end

local function nonfinite(x) return x ~= x or x == math.huge or x == -math.huge end

-- run(cfg, opts) -> summary {steps, total, first_loss, last_loss, losses = {[step] = loss},
--   checkpoint, checkpoint_dir, diffusers, resumed_from, model, pipe, seconds}
-- opts: log (function(msg)), progress (true/false: the progress bar; default: stdout is a
--   terminal, or logging.progress), device, stop_after (end this run after that many steps, with a
--   checkpoint, as if interrupted), draws (function(batch, {step=, micro=}) -> flow-matching draws:
--   replayed random numbers, for tests).
local watching = {}   -- the signals this run watches (unwatched however it ends)
local function run(cfg, opts)
    opts = opts or {}
    local log = opts.log or function(msg) io.stdout:write(msg, "\n"); io.stdout:flush() end
    M.validate(cfg)
    local bm = M.batch_math(cfg)
    -- several processes: rank 0 alone prints, writes metrics and publishes checkpoints
    local ws = world()
    local main = select(2, world()) == 0
    if not main then log = function() end end
    local fmok, fm = pcall(require("nemo.flow_matching").FlowMatching, cfg.flow_matching)
    if not fmok then cfg_error(tostring(fm)) end
    local lrs_cfg = cfg.lr_scheduler
    if lrs_cfg ~= nil then
        for k in pairs(lrs_cfg) do
            if not lrs.KEYS[k] then
                cfg_error(string.format("unknown key 'lr_scheduler.%s' (known keys of lr_scheduler: %s)", k,
                    table.concat(sorted_keys(lrs.KEYS), ", ")))
            end
        end
    end
    -- the device: opts.device, the config's `device`, else cuda:LOCAL_RANK when CUDA is present, else cpu
    local device = opts.device or cfg.device
    if device == nil or device == "auto" then device = pipeline._choose_device() end
    if device == "cuda" then device = "cuda:" .. dist.env().local_rank end
    if device ~= "cpu" and not (nemo.cuda and nemo.cuda.is_available()) then
        cfg_error(string.format("device '%s': no CUDA device (%s); use --device cpu", device,
            nemo.cuda and tostring(nemo.cuda.unavailable_reason()) or "nemo-lua was built without CUDA"))
    end
    -- the process group: MPI between CPU processes, NCCL between GPUs (dist_env.backend "nccl",
    -- Automodel's default, means MPI when the tensors are on the CPU), itself for one process
    local iok, ierr = pcall(dist.init_for_device, device, cfg.dist_env)
    if not iok then raise("dist_env: ", ierr) end
    local group = dist.group_world()
    local function barrier() if ws > 1 then dist.barrier() end end

    if cfg.demo and cfg.demo.enabled then
        if main then ensure_demo(cfg, log) end
        barrier()
        if not main then ensure_demo(cfg, log) end   -- the paths only: rank 0 made the assets
    end
    local seed = cfg.seed or 42
    local dp_size, dp_rank = bm.dp_size, bm.dp_rank
    local ss, ck = cfg.step_scheduler, cfg.checkpoint
    local ck_enabled = ck.enabled ~= false
    local ck_dir = ck.checkpoint_dir or "checkpoints"
    local consolidated = M.consolidated_mode(ck.save_consolidated)

    -- the checkpoint to resume from: an explicit one must exist (checked before anything is loaded)
    local resume_dir
    if ck_enabled then
        if ck.restore_from and ck.restore_from ~= "LATEST" and ck.restore_from ~= "latest" then
            local ok, dir = pcall(checkpoint.resolve, ck.restore_from, ck_dir)
            if not ok then raise("", dir) end
            resume_dir = dir
        else
            resume_dir = checkpoint.latest(ck_dir)
        end
    end

    -- data (before the model: a missing or broken cache is reported before a large model loads)
    local loader, held = build_data(cfg, bm, dp_rank, seed, device)
    local vcfg = cfg.validation and cfg.validation.enabled ~= false and cfg.validation or nil
    local val_ds, val_every
    if vcfg then
        local sc = vcfg.sampling
        if not vcfg.cache_dir and not vcfg.holdout and not (sc and sc.prompts) then
            cfg_error("validation.cache_dir is required: a latent cache of held-out samples (the format of " ..
                "data.dataloader.cache_dir; the training cache itself gives a fixed-noise training loss), or " ..
                "validation.holdout: N samples of the training cache set aside, unless validation.sampling.prompts " ..
                "alone is wanted")
        end
        val_every = vcfg.every_steps or ss.val_every_steps or ss.ckpt_every_steps or 100
        if vcfg.cache_dir then
            local dok, ds = pcall(require("nemo.data").Dataset, vcfg.cache_dir,
                {model_type = cfg.data.dataloader.model_type})
            if not dok then raise("validation.cache_dir: ", ds) end
            val_ds = ds
        end
        val_ds = val_ds or held
    end
    local batches_per_epoch = loader:len()
    if batches_per_epoch < 1 then error("data: the dataloader yields no batch (empty dataset)", 0) end
    local grad_acc = bm.grad_acc
    local epoch_len = math.ceil(batches_per_epoch / grad_acc)
    local num_epochs = ss.num_epochs
    if num_epochs == nil then num_epochs = ss.max_steps and math.ceil(ss.max_steps / epoch_len) or 10 end
    local total = epoch_len * num_epochs
    if ss.max_steps then total = math.min(total, ss.max_steps) end
    if lrs_cfg then   -- the schedule's checks (warmup below decay steps, ...) before a large model loads
        local probe = nemo.optim.AdamW({nemo.zeros({1}):requires_grad_()}, {lr = cfg.optimizer.lr,
            weight_decay = cfg.optimizer.weight_decay or 0.01})
        local pok, perr = pcall(lrs.build, probe, lrs_cfg, total)
        if not pok then cfg_error(string.format("%s (this run has %d steps)", strip_pos(perr), total)) end
    end

    -- model
    nemo.manual_seed(seed)
    local mcfg = cfg.model
    -- canonical names ("bf16" -> "bfloat16"; validate checked them and the mixed-precision rule)
    local torch_dtype = M.dtype_name(mcfg.torch_dtype, "model.torch_dtype") or "bfloat16"
    local compute_dtype = M.dtype_name(mcfg.compute_dtype, "model.compute_dtype") or torch_dtype
    local block = cfg.fsdp or cfg.ddp or {}
    local ac = block.activation_checkpointing
    if ac == nil then ac = cfg.fsdp ~= nil end   -- Automodel: diffusion default true when the key is absent
    local ignored = {}
    for _, k in ipairs { "transformer_engine_fp8", "transformer_engine_linear", "fuse_qkv_projections" } do
        if mcfg[k] then ignored[#ignored + 1] = "model." .. k end
    end
    if mcfg.attention_backend then ignored[#ignored + 1] = "model.attention_backend" end
    if block.enable_compile then ignored[#ignored + 1] = (cfg.fsdp and "fsdp" or "ddp") .. ".enable_compile" end
    if cfg.ddp and block.cpu_offload then ignored[#ignored + 1] = "ddp.cpu_offload" end
    local prof = cfg.profiling
    if prof and (prof.enabled or (prof.torch_profiler and prof.torch_profiler.enabled)) then
        ignored[#ignored + 1] = "profiling"
    end
    if cfg.data.dataloader.dynamic_batch_size and demo_kind(cfg) == nil and
       DATALOADER_TARGETS[cfg.data.dataloader._target_ or "nemo.data.build_dataloader"] == "mock" then
        ignored[#ignored + 1] = "data.dataloader.dynamic_batch_size (the mock loader's batches are all one size)"
    end
    if #ignored > 0 then
        log("note: features nemo-lua does not have (GPU/PyTorch-only), ignored on this run: " .. table.concat(ignored, ", "))
    end
    local mode = mcfg.mode or "finetune"
    if not mcfg.pretrained_model_name_or_path then cfg_error("model.pretrained_model_name_or_path is required") end
    local stage = mcfg.stage ~= json.null and mcfg.stage or nil
    local pok, pipe = pcall(function()
        if mode == "finetune" then
            return pipeline.NeMoAutoDiffusionPipeline.from_pretrained(mcfg.pretrained_model_name_or_path, {
                torch_dtype = torch_dtype, device = device, load_for_training = true, components_to_load = {"transformer"},
                enable_gradient_checkpointing = ac,
                active_transformer = stage and (stage == "low_noise" and "transformer_2" or "transformer") or nil})
        end
        return pipeline.NeMoAutoDiffusionPipeline.from_config(mcfg.pretrained_model_name_or_path, mcfg.pipeline_spec,
            {torch_dtype = torch_dtype, device = device, enable_gradient_checkpointing = ac})
    end)
    if not pok then raise("model.pretrained_model_name_or_path: ", pipe) end
    local model = pipe.transformer
    if not model then error("the pipeline has no transformer to train", 0) end
    if stage then
        -- Wan 2.2 (Automodel): the expert's sigma window, [boundary, 1] (high noise) or [0, boundary]
        local br = mcfg.boundary_ratio
        if br == nil or br == json.null then br = pipe.config and pipe.config.boundary_ratio end
        if type(br) ~= "number" or not (br > 0 and br < 1) then
            cfg_error(string.format("model.stage %s needs a boundary_ratio in (0, 1): set model.boundary_ratio or use " ..
                "a pipeline whose model_index.json has one (Wan 2.2: 0.875), got %s", stage, tostring(br)))
        end
        if stage == "high_noise" then fm.sigma_min, fm.sigma_max = br, 1
        else fm.sigma_min, fm.sigma_max = 0, br end
        log(string.format("Wan 2.2 stage %s: training %s, sigma in [%g, %g]", stage,
            stage == "low_noise" and "transformer_2" or "transformer", fm.sigma_min, fm.sigma_max))
    end
    if not ac and model.disable_gradient_checkpointing then model:disable_gradient_checkpointing() end
    model:train()
    check_data_fits(model, loader, fm, cfg.data.dataloader.cache_dir or "mock data")
    local validator
    if val_ds then
        check_data_fits(model, {dataset = val_ds}, fm, (vcfg.cache_dir or "held out") .. " (validation)")
        local V = require "nemo.validation"
        local vok, v = pcall(function()
            return V.Validator {dataset = val_ds, fm = fm, sigmas = V.sigmas(vcfg, fm), seed = vcfg.seed or 0,
                batch_size = vcfg.batch_size or bm.local_bs, max_samples = vcfg.max_samples, dp_rank = dp_rank,
                dp_size = dp_size, device = device, compute_dtype = compute_dtype}
        end)
        if not vok then cfg_error(strip_pos(v)) end
        validator = v
    end
    local sig = model_signature(model)   -- before sharding: it reads the model's config only
    local nparams = model:num_parameters()
    -- LoRA: adapters on the matched Linear layers, everything else frozen (before the manager:
    -- FSDP2 keeps frozen parameters whole and shards the adapters)
    local peft_cfg
    if cfg.peft then
        local peft = require "nemo.peft"
        peft_cfg = peft.PeftConfig(cfg.peft)
        if PEFT_MODEL_TYPES[mcfg.model_type] ~= class_name(model) then
            cfg_error(string.format("model.model_type '%s' names a %s, but %s holds a %s", mcfg.model_type,
                PEFT_MODEL_TYPES[mcfg.model_type], mcfg.pretrained_model_name_or_path, class_name(model)))
        end
        if not peft_cfg.lora_dtype then peft_cfg.lora_dtype = torch_dtype end   -- the base weights' dtype
        local n = peft.apply_lora(model, peft_cfg, {generator = nemo.Generator(seed * 7919 + 3)})
        if n == 0 then
            cfg_error(string.format("peft: no Linear layer of the %s matches peft.target_modules (%s); check " ..
                "target_modules against the model's module names (e.g. transformer_blocks.0.attn.to_q)",
                class_name(model), table.concat(peft_cfg.target_modules, ", ")))
        end
        peft.freeze_base(model)
        local ntrain = 0
        for _, e in ipairs(peft.lora_parameters(model)) do ntrain = ntrain + e[2]:numel() end
        sig.peft = {dim = peft_cfg.dim, alpha = peft_cfg.alpha, target_modules = peft.adapted_modules(model)}
        log(string.format("LoRA: %d Linear layers adapted (dim %d, alpha %s, %s): %d trainable parameters of %d",
            n, peft_cfg.dim, tostring(peft_cfg.alpha), peft_cfg.lora_dtype, ntrain, nparams + ntrain))
    end

    -- the parallel manager from the fsdp: / ddp: block (nemo.parallel); FSDP2 on one process
    -- shards nothing unless mixed precision asks for float32 master weights
    local mgr
    if block_given(cfg) then
        local margs = {_manager_type = cfg.fsdp and "fsdp2" or "ddp"}
        for k, v in pairs(cfg.fsdp or cfg.ddp) do margs[k] = v end
        margs.activation_checkpointing = ac
        if cfg.ddp then margs.cpu_offload = nil end   -- reported as ignored above (FSDP2 offloads)
        margs.enable_compile = nil
        margs.backend = nil                -- Automodel drops it too: the group's backend is dist_env's
        if cfg.fsdp and compute_dtype ~= torch_dtype then
            margs.mp_policy = {param_dtype = compute_dtype, reduce_dtype = margs.reduce_dtype or "float32"}
            margs.reduce_dtype = nil
        end
        local mok, m = pcall(function()
            local mm = require("nemo.parallel")._create_parallel_manager(margs)
            mm:parallelize(model)
            return mm
        end)
        if not mok then raise(cfg.fsdp and "fsdp: " or "ddp: ", m) end
        mgr = m
    end
    -- (a tensor-parallel model is in pieces even on one data-parallel rank: sharded checkpoints)
    local sharded = mgr ~= nil and mgr.sharded and (not mgr.plain or mgr.tp_group ~= nil)
    local params, named_params = {}, {}
    if mgr then
        named_params = mgr:named_parameters()
    else
        for name, p in model:named_parameters() do if p.requires_grad then named_params[#named_params + 1] = {name, p} end end
    end
    for i, e in ipairs(named_params) do params[i] = e[2] end

    -- samples from the model at each validation (validation.sampling): the pipeline's VAE and
    -- scheduler, the prompts' embeddings (the validation cache's or encoded once, here)
    local sampler
    if vcfg and vcfg.sampling then
        local sok, sm = pcall(M._build_sampler, {cfg = cfg, vcfg = vcfg, model = model, val_ds = val_ds,
            train_ds = loader.dataset, device = device, dtype = compute_dtype, writer = main,
            out_dir = ck_dir .. "/samples", stage = stage})
        if not sok then raise("validation.sampling: ", sm) end
        sampler = sm
    end

    -- optimizer, schedule, objective
    local opt = build_optimizer(cfg, params)
    -- an exponential moving average of the trainable parameters (diffusers' EMAModel; this rank's
    -- shards under FSDP2; a LoRA run's adapters), stepped after each optimizer step, saved in the
    -- checkpoints (ema/; a LoRA run's also as an adapter there) and, unless ema.export is false,
    -- what the diffusers export holds
    local ema
    if cfg.ema and cfg.ema.enabled ~= false then
        local eo = {}
        for k, v in pairs(cfg.ema) do if k ~= "enabled" and k ~= "export" then eo[k] = v end end
        local names = {}
        for i, e in ipairs(named_params) do names[i] = e[1] end
        local eok, em = pcall(require("nemo.ema").EMAModel, params, eo)
        if not eok then cfg_error("ema: " .. tostring(em):gsub("^EMAModel: ", "")) end
        ema = {model = em, params = params, names = names}
    end
    local sok, sched = pcall(function() return lrs_cfg and lrs.build(opt, lrs_cfg, total) or lrs.constant(opt) end)
    if not sok then cfg_error(tostring(sched)) end
    local max_norm = (cfg.clip_grad_norm and cfg.clip_grad_norm.max_norm) or 1.0
    local check_loss = cfg.performance and cfg.performance.check_loss
    local fm_gen = nemo.Generator(seed * 1000003 + 17)

    -- resume
    local step, epoch = 0, 0
    local best_val   -- the lowest validation loss a checkpoint holds (LOWEST_VAL)
    if resume_dir then
        local saved = checkpoint.model_config(resume_dir)
        local diff = saved and signature_diff(saved, sig)
        if diff then
            error(string.format("checkpoint %s was written for another model config than this run's (%s); " ..
                "use another checkpoint.checkpoint_dir, or set checkpoint.restore_from to a checkpoint of this model",
                resume_dir, diff), 0)
        end
        local tok, tr = pcall(checkpoint.trainer_state, resume_dir)
        if not tok then raise("", tr) end
        if tr.sampler then
            local lok, lerr = pcall(loader.load_state_dict, loader, tr.sampler)
            if not lok then
                raise(string.format("checkpoint %s: its data position does not fit this run's data: ", resume_dir), lerr)
            end
        end
        local ok, err = pcall(checkpoint.load, resume_dir, {model = model, optimizer = opt, scheduler = sched,
            manager = sharded and mgr or nil, ema = ema})
        if not ok then raise("", err) end
        step = tr.step + 1
        epoch = tr.sampler and tr.sampler.epoch or tr.next_epoch or tr.epoch
        if tr.rng then
            if tr.rng.flow then fm_gen:set_state(tr.rng.flow) end
            if tr.rng.default then nemo.default_generator:set_state(tr.rng.default) end
        end
        log(string.format("resumed from %s: next step %d, epoch %d", resume_dir, step, epoch))
        -- the lowest validation loss so far: LOWEST_VAL's checkpoint, if it is not past the resumed step
        local lv = checkpoint.read_latest(ck_dir, "LOWEST_VAL")
        local lj = lv and ck_dir .. "/" .. lv .. "/losses.json"
        if lj and fs.isfile(lj) then
            local lt, ldir = json.read_file(lj), ck_dir .. "/" .. lv
            if type(lt.val_loss) == "number" and fs.isfile(ldir .. "/trainer.json") and
               checkpoint.trainer_state(ldir).step <= tr.step then
                best_val = lt.val_loss
            end
        end
        if tr.total_steps and tr.total_steps ~= total and lrs_cfg then
            log(string.format("note: %s was written by a run of %d steps, this one has %d; the LR schedule continues " ..
                "as saved in the checkpoint (decay over %s steps)", resume_dir, tr.total_steps, total,
                tostring(sched.lr_decay_steps)))
        end
    elseif ck.restore_from == "LATEST" or ck.restore_from == "latest" then
        log("checkpoint.restore_from LATEST: no checkpoint in " .. ck_dir .. " yet, starting from step 0")
    end
    if ck_enabled and main then
        fs.mkdirs(ck_dir)
        for _, n in ipairs(checkpoint.clean_incomplete(ck_dir)) do
            log("removed " .. ck_dir .. "/" .. n .. " (a checkpoint save that did not finish)")
        end
    end
    barrier()
    local summary = {steps = 0, total = total, checkpoint_dir = ck_dir, losses = {}, resumed_from = resume_dir,
                     model = model, pipe = pipe, grad_acc = grad_acc}
    if step >= total or epoch >= num_epochs then
        log(string.format("training already finished: %d of %d steps done (checkpoints in %s; to train again, remove " ..
            "it or pass --checkpoint.checkpoint_dir DIR)", step, total, ck_dir))
        summary.finished = true
        return summary
    end

    local metrics_path = (cfg.logging and cfg.logging.metrics_file) or (ck_dir .. "/metrics.jsonl")
    local metrics = {write = function() end, flush = function() end, close = function() end}
    if main then
        fs.mkdirs(fs.dirname(metrics_path))
        truncate_metrics(metrics_path, step)
        metrics = assert(io.open(metrics_path, "a"))
    end
    -- loss_avg: the mean loss of the last loss_average_window_steps steps [50] (Automodel's key); a
    -- resumed run refills the window from metrics.jsonl, so the values are the uninterrupted run's
    local window, recent_losses = ss.loss_average_window_steps or 50, {}
    if main and step > 0 and fs.isfile(metrics_path) then
        for l in io.lines(metrics_path) do
            local ok, m = pcall(json.decode, l)
            if ok and type(m) == "table" and type(m.loss) == "number" and m.step and m.step < step then
                recent_losses[#recent_losses + 1] = m.loss
                if #recent_losses > window then table.remove(recent_losses, 1) end
            end
        end
    end
    local log_every = (cfg.logging and cfg.logging.log_every) or ss.log_remote_every_steps or 1
    local progress = opts.progress
    if progress == nil and cfg.logging and cfg.logging.progress ~= nil then progress = cfg.logging.progress end
    if progress == nil then progress = is_tty end
    if not main then progress = false end

    -- a message while the progress bar is shown: clear the bar line first
    local bar_line
    local function say(msg)
        if bar_line then io.stdout:write("\r\27[K") end
        log(msg)
        if bar_line then io.stdout:write(bar_line); io.stdout:flush() end
    end

    log(string.format("training %s (%s, %d parameters) on %s: steps %d..%d of %d, %d epoch%s of %d steps; " ..
        "global batch %d = %d x %d grad-acc x %d dp; metrics in %s",
        sig._class_name, mode, nparams, device, step, total - 1, total, num_epochs,
        num_epochs == 1 and "" or "s", epoch_len, bm.global_bs, bm.local_bs, grad_acc, dp_size, metrics_path))
    if ws > 1 or mgr then
        local info = mgr and mgr:info() or {}
        log(string.format("data parallel: %d process%s (%s backend), %s manager%s%s%s", ws, ws == 1 and "" or "es",
            dist.get_backend(), mgr and mgr.manager_type or "no",
            sharded and not mgr.plain and string.format(", %d units sharded over %d ranks%s", info.units or 0,
                info.shard or 1, (info.replicate or 1) > 1 and string.format(" x %d replicas (HSDP)", info.replicate)
                or "") or "",
            mgr and mgr.mixed and (", mixed precision: " .. compute_dtype .. " compute, float32 master weights") or "",
            mgr and mgr.offload and ", CPU offload: shards, gradients and optimizer state in host memory" or ""))
    end
    if ema then
        local eo = ema.model.opts
        log(string.format("EMA of the trainable parameters: decay %g (warm-up %s), the %s", eo.decay,
            eo.use_ema_warmup and string.format("1 - (1 + k / %g)^-%g", eo.inv_gamma, eo.power) or "(1 + k) / (10 + k)",
            cfg.ema.export == false and "export holds the trained weights" or "export holds the averages"))
    end
    local smp = loader.sampler
    if smp and smp.dynamic_batch_size then
        local parts = {}
        for _, b in ipairs(loader.dataset.buckets) do
            parts[#parts + 1] = string.format("%d @ %s", smp._bucket_bs[b.key], b.key)
        end
        log(string.format("dynamic_batch_size: samples per micro-batch and rank by latent size (base %dx%d pixels " ..
            "for %d): %s", smp.base_resolution[1], smp.base_resolution[2], bm.local_bs, table.concat(parts, ", ")))
    end
    if bm.tp_size > 1 then
        local flux_model = tostring(getmetatable(model).__name):find("Flux") ~= nil
        local heads = rawget(model, "_tp_attention") and "attention heads, " or ""
        log(string.format("tensor parallel: %d ranks share each layer of the model's plan (%s)%s", bm.tp_size,
            heads .. (flux_model and "MLPs, AdaLN linears" or "the ffn, condition embedders and output projection"),
            heads == "" and string.format("; the attention stays whole (%d heads are not a multiple of tp_size x " ..
                "cp_size = %d, or LoRA adapts it)", model.config.num_attention_heads, bm.tp_size * bm.cp_size) or ""))
    end
    if bm.cp_size > 1 then
        log(string.format("context parallel: %d ranks split each sample's tokens (Ulysses attention); %d " ..
            "data-parallel rank%s", bm.cp_size, dp_size, dp_size == 1 and "" or "s"))
    end

    local t_start = now()
    local steps_this_run = 0
    local recent = {}
    local last_ckpt
    local ck_every = ss.ckpt_every_steps or 100
    local keep = ck.max_recent_checkpoints
    local every_epoch = ss.save_checkpoint_every_epoch ~= false   -- Automodel's default: true

    -- checkpoint.is_async: the save being written in the background, published by settle() at the
    -- next save, at a preemption and at the end of the run, and by fail before it stops the run.
    -- publish_pending() -> true, or false and the error
    local pending
    local function publish_pending()
        if not pending then return true end
        local p = pending
        pending = nil
        local ok, dir = pcall(checkpoint.finish, p.p)
        if not ok then return false, dir end
        p.after(dir)
        return true
    end
    local function fail(msg)
        publish_pending()   -- a good checkpoint still being written goes on disk before stopping
        metrics:close()
        if bar_line then io.stdout:write("\n") end
        error(msg .. (last_ckpt and ("; the last good checkpoint is " .. last_ckpt) or
            (resume_dir and ("; the last good checkpoint is " .. resume_dir) or "")), 0)
    end

    local val_now   -- the last validation: {step, loss} (the loss LOWEST_VAL compares)
    local function settle()
        local ok, err = publish_pending()
        if not ok then fail(strip_pos(err)) end
    end
    local function save(at_step, at_epoch, end_of_epoch, final)
        local bad = nonfinite_parameter(named_params)
        if bad then
            fail(string.format("parameter %s is not finite after step %d: training stopped; no checkpoint was " ..
                "written from this state", bad, at_step))
        end
        local sampler = loader:state_dict()
        if end_of_epoch then sampler.epoch, sampler.batch_index = at_epoch + 1, 0 end
        local tr = {sampler = sampler, rng = {flow = fm_gen:get_state(), default = nemo.default_generator:get_state()},
                    next_epoch = sampler.epoch, total_steps = total}
        -- a LoRA run's export is its adapter (model/adapter_model.safetensors, in every checkpoint)
        local export = not peft_cfg and (consolidated == "every" or (consolidated == "final" and final))
        -- the consolidated export: rank 0 writes it; under FSDP2 every rank gathers the model for it
        local function export_fn(tmp) pipe:save_pretrained(tmp .. "/diffusers") end
        local extra, extra_all
        if export and sharded then
            extra_all = function(tmp) mgr:summon_full_params(function() if main then export_fn(tmp) end end) end
        elseif export then
            extra = export_fn
        end
        if ema and cfg.ema.export ~= false then   -- the export holds the averages (as diffusers' EMAModel.copy_to)
            local inner_all, inner = extra_all, extra
            if inner_all then extra_all = function(tmp) ema.model:swap(params, inner_all, tmp) end end
            if inner then   -- rank 0 writes; the swap is local (without FSDP2 every rank holds everything)
                extra = function(tmp) ema.model:swap(params, inner, tmp) end
            end
        end
        -- losses.json, and LOWEST_VAL when this step's validation loss is the lowest so far
        local vl = val_now and val_now.step == at_step and val_now.loss or nil
        local lowest = vl ~= nil and (best_val == nil or vl < best_val)
        if lowest then best_val = vl end
        settle()   -- the previous background save is published first
        local r = checkpoint.save(ck_dir, {epoch = at_epoch, step = at_step, model = model, optimizer = opt,
            losses = {train_loss = summary.losses[at_step], val_loss = vl}, lowest_val = lowest,
            scheduler = sched, trainer = tr, config = cfg, model_config = sig, extra = extra, extra_all = extra_all,
            manager = sharded and mgr or nil, group = ws > 1 and group or nil, ema = ema, async = ck.is_async,
            peft = peft_cfg and {config = peft_cfg, base = mcfg.pretrained_model_name_or_path} or nil})
        local after = function(dir)
            last_ckpt = dir
            if lowest then say(string.format("lowest validation loss so far (%.5f): LOWEST_VAL names %s", vl, dir)) end
            if export then summary.diffusers = dir .. "/diffusers" end
            if peft_cfg then summary.adapter = dir .. "/model" end
            if keep then
                for _, n in ipairs(checkpoint.prune(ck_dir, keep)) do
                    say("removed " .. ck_dir .. "/" .. n .. " (max_recent_checkpoints)")
                end
                if summary.diffusers and not fs.isdir(summary.diffusers) then summary.diffusers = nil end
            end
        end
        if type(r) == "table" then pending = {p = r, after = after}   -- checkpoint.is_async: published later
        else after(r) end
    end

    -- the validation loss (nemo.validation): fixed sigmas and noise on the validation cache, every
    -- val_every steps, at the last step and (a fresh run, unless at_start is false) before the first
    -- step as "step": -1; with validation.ema also of the averages
    summary.val = {}
    local function validate(at_step)
        local function one()
            return validator:run(model, {clock = now, all_reduce = ws > 1 and function(v)
                return dist.all_reduce_numbers(v, "sum") end or nil})
        end
        local res = one()
        local res_ema = vcfg.ema and ema.model:swap(params, one) or nil
        for _, r in ipairs { res, res_ema or res } do
            if nonfinite(r.loss) then
                fail(string.format("the validation loss is %s after step %d%s: training stopped", tostring(r.loss),
                    at_step, r == res_ema and " (the EMA weights)" or ""))
            end
        end
        metrics:write(json.encode({step = at_step, val_loss = res.loss, val_loss_by_sigma = res.by_sigma,
            val_sigmas = validator.sigmas, val_samples = res.samples, val_time = res.seconds,
            val_loss_ema = res_ema and res_ema.loss or nil, val_loss_ema_by_sigma = res_ema and res_ema.by_sigma or nil}),
            "\n")
        metrics:flush()
        local parts = {}
        for k, sg in ipairs(validator.sigmas) do parts[k] = string.format("%g: %.4f", sg, res.by_sigma[k]) end
        say(string.format("validation %s: loss %.5f%s over %d samples x %d sigmas (%s) in %.1f s",
            at_step < 0 and "before training" or ("after step " .. at_step), res.loss,
            res_ema and string.format(", EMA weights %.5f", res_ema.loss) or "", res.samples, #validator.sigmas,
            table.concat(parts, ", "), res.seconds + (res_ema and res_ema.seconds or 0)))
        summary.val[at_step] = {loss = res.loss, by_sigma = res.by_sigma, ema = res_ema}
        -- the weights the export holds: the averages unless ema.export is false
        val_now = {step = at_step, loss = (res_ema and cfg.ema.export ~= false) and res_ema.loss or res.loss}
    end
    -- samples (validation.sampling), made with the averages under validation.ema
    summary.samples = {}
    local function make_samples(at_step)
        local t0 = now()
        local tag = at_step < 0 and "before_training" or ("step_" .. at_step)
        local files = vcfg.ema and ema.model:swap(params, sampler.run, sampler, model, tag) or sampler:run(model, tag)
        summary.samples[at_step] = files
        if main then
            say(string.format("samples %s: %d %s%s in %s/%s (%.1f s)", at_step < 0 and "before training" or
                ("after step " .. at_step), #files, sampler.kind == "image" and "image" or "video",
                #files == 1 and "" or "s", sampler.output_dir, tag, now() - t0))
        end
    end
    local function evaluate(at_step)
        if validator then validate(at_step) end
        if sampler then make_samples(at_step) end
    end
    if validator then
        log(string.format("validation: %d samples of %s at sigmas %s, every %d steps", validator.samples,
            vcfg.cache_dir or (cfg.data.dataloader.cache_dir .. " (held out: not trained on)"),
            table.concat(validator.sigmas, ", "), val_every))
    end
    if sampler then
        log(string.format("validation samples: %d %s%s of %dx%d%s, %d steps, guidance %g, every %d steps, in %s",
            #sampler.prompts, sampler.kind == "image" and "image" or "video", #sampler.prompts == 1 and "" or "s",
            sampler.width, sampler.height,
            sampler.kind == "video" and (" x " .. sampler.num_frames .. " frames") or "", sampler.num_inference_steps,
            sampler.guidance_scale, val_every, sampler.output_dir))
    end
    if vcfg and step == 0 and vcfg.at_start ~= false then evaluate(-1) end

    local stop_after = opts.stop_after
    local stopped = false
    -- the preemption signals (SIGTERM unless step_scheduler.preemption_signal says otherwise):
    -- recorded by a C handler, polled after each step, agreed on by every rank
    local sigs = M.preemption_signals(ss.preemption_signal)
    for _, sg in ipairs(sigs) do
        if nffi.C.nemo_signal_watch(sg) ~= 0 then error(ffi.string(nffi.C.nemo_last_error()), 0) end
        watching[#watching + 1] = sg
    end
    local function preempted()
        if #sigs == 0 then return nil end
        local got = 0
        for _, sg in ipairs(sigs) do if nffi.C.nemo_signal_received(sg) ~= 0 then got = sg end end
        if ws > 1 then got = dist.all_reduce_number(got, "max") end
        return got > 0 and signal_name(got) or nil
    end
    while step < total and epoch < num_epochs and not stopped do
        loader:set_epoch(epoch)
        local it = loader:iter()
        local end_of_epoch = false
        while step < total and not stopped do
            -- one optimizer step's micro-batches
            local micro = {}
            for _ = 1, grad_acc do
                local b = it()
                if not b then break end
                micro[#micro + 1] = b
            end
            if #micro == 0 then end_of_epoch = true; break end
            local t0 = now()
            opt:zero_grad()
            local loss_sum, step_flops, step_samples = 0, 0, 0
            for mi, batch in ipairs(micro) do
                local sopts = {generator = fm_gen, compute_dtype = compute_dtype}
                if opts.draws then sopts.draws = opts.draws(batch, {step = step, micro = mi})
                elseif dp_size > 1 then
                    -- every rank draws the whole global batch's randoms from the same generator
                    -- and takes its slice: N ranks x B == one process x N*B, draw for draw
                    local x0 = batch.image_latents or batch.video_latents
                    local b = x0.shape[1]
                    local sample_shape = {}
                    for i = 2, #x0.shape do sample_shape[i - 1] = x0.shape[i] end
                    local gd = fm:global_draws(b * dp_size, sample_shape, {generator = fm_gen,
                        compute_dtype = compute_dtype, device = device})
                    sopts.draws = require("nemo.flow_matching").slice_draws(gd, dp_rank * b, b)
                end
                if mgr then mgr:set_requires_gradient_sync(mi == #micro) end
                -- the forward's products, counted as they run (this rank's share under tp / cp)
                local fwd, loss = flops.count(fm.step, fm, model, batch, sopts)
                step_flops = step_flops + fwd
                step_samples = step_samples + (batch.image_latents or batch.video_latents).shape[1] * dp_size
                local lv = loss:item()
                if ws > 1 then   -- every rank stops together, whichever rank's loss went bad
                    local bad = dist.all_reduce_number((nonfinite(lv) or (check_loss and lv > 100)) and 1 or 0, "max")
                    if bad > 0 and not nonfinite(lv) and not (check_loss and lv > 100) then
                        fail(string.format("the loss of another rank is not finite or exploded at step %d (epoch %d, " ..
                            "micro-batch %d): training stopped; no checkpoint was written from this state", step,
                            epoch, mi))
                    end
                end
                if nonfinite(lv) then
                    fail(string.format("loss is %s at step %d (epoch %d, micro-batch %d): training stopped; no " ..
                        "checkpoint was written from this state", tostring(lv), step, epoch, mi))
                end
                if check_loss and lv > 100 then
                    fail(string.format("loss exploded (%g > 100) at step %d (performance.check_loss): training " ..
                        "stopped; no checkpoint was written from this state", lv, step))
                end
                loss_sum = loss_sum + lv
                local scaled = loss / #micro
                scaled:backward()
            end
            if mgr then mgr:finish_gradient_synchronization() end
            local grad_norm = mgr and mgr:clip_grad_norm_(max_norm) or nemo.optim.clip_grad_norm_(params, max_norm)
            if nonfinite(grad_norm) then
                fail(string.format("gradient norm is %s at step %d (epoch %d): training stopped; no checkpoint was " ..
                    "written from this state", tostring(grad_norm), step, epoch))
            end
            local lr = opt.param_groups[1].lr
            opt:step()
            sched:step(1)
            if ema then ema.model:step(params) end
            collectgarbage()
            local mean_loss = loss_sum / #micro
            if ws > 1 then mean_loss = dist.all_reduce_number(mean_loss, "avg") end   -- the mean over all ranks
            local dt = now() - t0
            summary.first_loss = summary.first_loss or mean_loss
            summary.last_loss = mean_loss
            summary.losses[step] = mean_loss
            steps_this_run = steps_this_run + 1
            recent[#recent + 1] = dt
            if #recent > 20 then table.remove(recent, 1) end
            local mem = nemo.memory_stats(device)
            recent_losses[#recent_losses + 1] = mean_loss
            if #recent_losses > window then table.remove(recent_losses, 1) end
            local loss_avg = 0
            for _, v in ipairs(recent_losses) do loss_avg = loss_avg + v end
            loss_avg = loss_avg / #recent_losses
            metrics:write(json.encode({step = step, epoch = epoch, loss = mean_loss, loss_avg = loss_avg, lr = lr,
                grad_norm = grad_norm, tflops = 3 * step_flops / dt / 1e12,
                step_time = dt, samples_per_sec = step_samples / dt,
                peak_memory_gb = mem.peak / 2^30, ema_decay = ema and ema.model.cur_decay_value or nil}), "\n")
            metrics:flush()

            local sps = 0
            for _, v in ipairs(recent) do sps = sps + v end
            sps = sps / #recent
            local eta = sps * (total - step - 1)
            if progress then
                bar_line = "\r" .. M.format_progress {done = step + 1, total = total, loss = mean_loss, lr = lr,
                    sec_per_step = sps, eta = eta} .. "\27[K"
                io.stdout:write(bar_line)
                io.stdout:flush()
            elseif step % log_every == 0 or step == total - 1 then
                log(M.format_log_line {step = step, total = total, epoch = epoch, loss = mean_loss, lr = lr,
                    grad_norm = grad_norm, sec_per_step = sps, eta = eta})
            end

            -- where the data stands now, and whether a checkpoint is due (Automodel's is_ckpt_step)
            end_of_epoch = loader:state_dict().batch_index >= batches_per_epoch
            local last = step == total - 1 or (end_of_epoch and epoch == num_epochs - 1)
            local signal = preempted()
            stopped = (stop_after ~= nil and steps_this_run >= stop_after or signal ~= nil) and not last
            if vcfg and (step % val_every == val_every - 1 or last) and not (signal and not last) then evaluate(step) end
            local due = step % ck_every == ck_every - 1 or (every_epoch and end_of_epoch) or last or stopped
            if ck_enabled and due then
                save(step, epoch, end_of_epoch, last)
                if last or signal then settle() end   -- the final and the preemption checkpoints are on disk
                if progress and (step % ck_every == ck_every - 1 or last) then
                    say(pending and ("writing " .. pending.p.final .. " in the background") or ("saved " .. last_ckpt))
                end
            end
            if signal and not last then
                summary.preempted = signal
                say(string.format("received %s after step %d: %s", signal, step, ck_enabled and
                    ("saved " .. last_ckpt .. "; the same command resumes from it") or
                    "stopping (checkpoint.enabled is false: nothing saved)"))
            end
            step = step + 1
            if end_of_epoch or last then break end
        end
        if end_of_epoch then epoch = epoch + 1 end
        if step >= total then break end
    end
    settle()
    if progress and bar_line then io.stdout:write("\n"); bar_line = nil end
    metrics:close()
    summary.steps = steps_this_run
    summary.checkpoint = last_ckpt
    summary.seconds = now() - t_start
    summary.stopped = stopped
    if summary.diffusers then log("saved the trained pipeline for diffusers in " .. summary.diffusers) end
    if summary.adapter then
        log("saved the LoRA adapter in " .. summary.adapter .. " (nemo.peft.load_adapter(transformer, dir) applies it; " ..
            "nemo.peft.merge folds it into the weights)")
    end
    if stopped then
        log(string.format("stopped after %d steps (next step %d of %d); resume with the same command", steps_this_run,
            step, total))
    end
    -- the loss at the start and the end of this run: single steps are noisy, so also a 10-step mean
    local first_mean, last_mean, n = 0, 0, math.max(1, math.min(10, math.floor(steps_this_run / 2)))
    local s0 = step - steps_this_run
    for i = 0, n - 1 do
        first_mean = first_mean + summary.losses[s0 + i] / n
        last_mean = last_mean + summary.losses[step - n + i] / n
    end
    summary.first_mean_loss, summary.last_mean_loss = first_mean, last_mean
    log(string.format("done: %d steps in %.1f s, loss %.4f -> %.4f (mean of %d steps: %.4f -> %.4f)%s", steps_this_run,
        summary.seconds, summary.first_loss or 0 / 0, summary.last_loss or 0 / 0, n, first_mean, last_mean,
        last_ckpt and (", checkpoint " .. last_ckpt) or ""))
    return summary
end

function M.run(cfg, opts)
    local res = {pcall(run, cfg, opts)}
    for _, sg in ipairs(watching) do nffi.C.nemo_signal_unwatch(sg) end
    watching = {}
    if not res[1] then error(res[2], 0) end
    return res[2]
end

-- main(arg, {default_config=, script=}): the recipes' entry point.
function M.main(args, opts)
    opts = opts or {}
    local a = M.parse_args(args or {})
    if a.help then
        print("usage: nemo-lua " .. (opts.script or "recipe.lua") .. " [-c config.yaml] [--section.key value ...]\n" ..
              "default config: " .. tostring(opts.default_config) .. "\n" ..
              "example: --optimizer.lr 3e-4 --step_scheduler.max_steps 50 --checkpoint.checkpoint_dir runs/x\n" ..
              "the config keys are listed in docs/training.md")
        return
    end
    local path = a.config or opts.default_config
    if not path or not fs.isfile(path) then cfg_error("config file not found: " .. tostring(path)) end
    local cfg = M.load_config(path, a.overrides)
    return M.run(cfg, opts)
end

-- cli(args, opts): main() for a recipe file. A deliberate error (bad config, bad data, NaN loss)
-- prints its message alone and exits with status 1; an unexpected one (a bug) keeps its traceback.
function M.cli(args, opts)
    local ok, err = xpcall(M.main, function(e)
        e = tostring(e)
        if e:match("^[^%s:]+%.lua:%d+: ") then return debug.traceback(e, 2) end
        return e
    end, args, opts)
    if not ok then
        io.stdout:flush()
        if dist.is_initialized() and dist.get_world_size() > 1 then
            -- the failing rank ends the whole job: the others may be waiting in a collective
            io.stderr:write(string.format("nemo-lua (rank %d of %d): %s\n", dist.get_rank(), dist.get_world_size(), err))
            io.stderr:flush()
            dist.abort(1)
        end
        io.stderr:write("nemo-lua: ", err, "\n")
        os.exit(1)
    end
    if dist.is_initialized() and dist.get_world_size() > 1 then dist.barrier() end
    return err
end

return M
