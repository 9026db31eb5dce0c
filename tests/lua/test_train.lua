-- The training recipe (lua/nemo/train.lua, recipes/flux_*.lua): config schema, overrides,
-- Automodel targets and removed keys, the demo assets, metrics.jsonl, determinism (runs and
-- thread counts), resume bit for bit (by path, by name, auto from LATEST, at an epoch boundary),
-- checkpoint layout/atomicity/retention/consolidated export, gradient accumulation, bad input,
-- the NaN guard, progress bar vs plain lines, and flux_pretrain. Every run is a tiny FLUX model
-- (24k parameters, 8x8 latents, 16 samples) so the whole file takes a few seconds.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local fs = require "nemo.fs"
local json = require "nemo.json"
local yaml = require "nemo.yaml"
local train = require "nemo.train"
local checkpoint = require "nemo.checkpoint"
local pipeline = require "nemo.pipeline"
local FM = require "nemo.flow_matching"
local synthetic = require "nemo.data.synthetic"

local tmp = os.tmpname()
os.remove(tmp)
fs.mkdirs(tmp)

-- ==== helpers ====

local function deepcopy(t)
    if type(t) ~= "table" then return t end
    local o = {}
    for k, v in pairs(t) do o[k] = deepcopy(v) end
    return o
end

local TINY_TRANSFORMER = {num_layers = 1, num_single_layers = 1, attention_head_dim = 8, num_attention_heads = 2,
                          in_channels = 16, joint_attention_dim = 16, pooled_projection_dim = 16,
                          axes_dims_rope = {2, 2, 4}, guidance_embeds = true}

-- c with over's {["section.key"] = value} set (json.null removes the key); returns c
local function with_overrides(c, over)
    for path, v in pairs(over or {}) do
        local node, parts = c, {}
        for p in path:gmatch("[^%.]+") do parts[#parts + 1] = p end
        for i = 1, #parts - 1 do node[parts[i]] = node[parts[i]] or {}; node = node[parts[i]] end
        if v == json.null then v = nil end
        node[parts[#parts]] = v
    end
    return c
end

-- The tiny config: 16 samples of 8x8 latents, batch 2 -> 8 batches (steps) per epoch, 10 steps.
local function tiny(dir, over)
    local c = {
        seed = 7,
        demo = {enabled = true, dir = tmp .. "/demo", samples = 16, resolutions = "8x8", text_len = 4,
                transformer = deepcopy(TINY_TRANSFORMER)},
        model = {pretrained_model_name_or_path = "unused", mode = "finetune", torch_dtype = "float32",
                 compute_dtype = "float32"},
        optimizer = {_target_ = "torch.optim.AdamW", lr = 1e-3, weight_decay = 0.01, betas = {0.9, 0.999}},
        lr_scheduler = {lr_decay_style = "cosine", lr_warmup_steps = 2, min_lr = 1e-4},
        clip_grad_norm = {max_norm = 1.0},
        flow_matching = {adapter_type = "flux", adapter_kwargs = {guidance_scale = 1}, timestep_sampling = "logit_normal",
                         flow_shift = 1.0, mix_uniform_ratio = 0.0, use_loss_weighting = false},
        step_scheduler = {num_epochs = 100, local_batch_size = 2, global_batch_size = 2, max_steps = 10,
                          ckpt_every_steps = 5, save_checkpoint_every_epoch = false},
        data = {dataloader = {_target_ = "nemo.data.build_dataloader", cache_dir = "unused"}},
        checkpoint = {enabled = true, checkpoint_dir = dir, save_consolidated = "final"},
    }
    return with_overrides(c, over)
end

local logs = {}
local function quiet(msg) logs[#logs + 1] = msg end
local function run(cfg, opts)
    opts = opts or {}
    opts.log = opts.log or quiet
    if opts.progress == nil then opts.progress = false end
    return train.run(cfg, opts)
end

local function read_metrics(path)
    local out = {}
    if not fs.isfile(path) then return out end
    for line in io.lines(path) do out[#out + 1] = json.decode(line) end
    return out
end

local sh = T.sh

local function file_eq(a, b) return fs.isfile(a) and fs.isfile(b) and fs.read(a) == fs.read(b) end
local function ckpt_names(dir)
    local out = {}
    for _, c in ipairs(checkpoint.list(dir)) do out[#out + 1] = c.name end
    return table.concat(out, ",")
end

-- ==== config: overrides, schema, targets, removed keys ====

local a = train.parse_args {"-c", "x.yaml", "--optimizer.lr", "3e-4", "--step_scheduler.max_steps", "5",
                            "--optimizer.betas", "[0.9, 0.95]", "--checkpoint.restore_from=null", "--seed=3"}
T.is(a.config, "x.yaml", "parse_args: -c FILE")
T.is(#a.overrides, 5, "parse_args: five overrides (--k v and --k=v)")
local c = tiny(tmp .. "/unused")
for _, o in ipairs(a.overrides) do train.apply_override(c, o.key, o.text) end
T.ok(type(c.optimizer.lr) == "number" and c.optimizer.lr == 3e-4, "--optimizer.lr 3e-4 is the number 3e-4")
T.ok(c.step_scheduler.max_steps == 5, "--step_scheduler.max_steps 5 is the number 5")
T.ok(type(c.optimizer.betas) == "table" and c.optimizer.betas[1] == 0.9 and c.optimizer.betas[2] == 0.95,
    "--optimizer.betas [0.9, 0.95] is a list")
T.ok(c.checkpoint.restore_from == yaml.null and c.seed == 3, "--key=null and --key=value")
train.apply_override(c, "demo.transformer.axes_dims_rope", "[2, 2, 4]")
T.ok(#c.demo.transformer.axes_dims_rope == 3, "a nested list override")
T.raises(function() train.parse_args {"--optimizer.lr"} end, "option --optimizer.lr needs a value", "override without a value")
T.raises(function() train.parse_args {"recipe.yaml"} end, "unexpected argument 'recipe.yaml'", "a stray argument")
T.raises(function() train.apply_override(tiny("x"), "seed.x", "1") end, "'seed' is a value, not a section",
    "an override below a value")

for _, f in ipairs { "recipes/flux_finetune.yaml", "recipes/flux_lora.yaml", "recipes/flux_pretrain.yaml",
                     "recipes/wan_finetune.yaml", "recipes/wan_lora.yaml", "recipes/wan_pretrain.yaml" } do
    local ok, err = pcall(train.load_config, f, {})
    T.ok(ok, "the shipped " .. f .. " validates", err)
end
local lc = train.load_config("recipes/flux_finetune.yaml", train.parse_args {"--optimizer.lr", "3e-4",
    "--step_scheduler.max_steps", "5"}.overrides)
T.ok(lc.optimizer.lr == 3e-4 and lc.step_scheduler.max_steps == 5, "load_config applies command-line overrides")

-- a config written with Automodel's keys and Python targets (as examples/diffusion/finetune/flux_t2i_flow.yaml)
local automodel_yaml = [[
model:
  pretrained_model_name_or_path: "black-forest-labs/FLUX.1-dev"
  mode: "finetune"
  cache_dir: null
  attention_backend: "flash"
  transformer_engine_fp8: true
  transformer_engine_fp8_recipe: "delayed"
  transformer_engine_fp8_amax_history_len: 1024
  transformer_engine_fp8_amax_compute_algo: "max"
optimizer:
  _target_: torch.optim.AdamW
  lr: 2e-5
  weight_decay: 0.01
  betas: [0.9, 0.999]
  foreach: false
  fused: true
performance:
  check_loss: false
  grad_clip_foreach: true
fsdp:
  dp_size: 8
  tp_size: 1
  cp_size: 1
  pp_size: 1
  activation_checkpointing: false
  cpu_offload: false
  defer_fsdp_grad_sync: true
  enable_compile: false
  enable_fsdp2_prefetch: true
  fsdp2_backward_prefetch_depth: 3
  fsdp2_forward_prefetch_depth: 2
flow_matching:
  adapter_type: "flux"
  adapter_kwargs:
    guidance_scale: 1
    use_guidance_embeds: false
  timestep_sampling: "logit_normal"
  logit_mean: 0.0
  logit_std: 1.0
  flow_shift: 1.0
  mix_uniform_ratio: 0.0
  sigma_min: 0.0
  sigma_max: 1.0
  num_train_timesteps: 1000
  i2v_prob: 0.0
  use_loss_weighting: false
  log_interval: 100
  summary_log_interval: 10
step_scheduler:
  num_epochs: 5000
  local_batch_size: 4
  global_batch_size: 32
  ckpt_every_steps: 500
  log_remote_every_steps: 1
  save_checkpoint_every_epoch: false
data:
  dataloader:
    _target_: nemo_automodel.components.datasets.diffusion.build_text_to_image_multiresolution_dataloader
    cache_dir: PATH_TO_YOUR_DATA
    train_text_encoder: false
    num_workers: 2
    base_resolution: [512, 512]
    dynamic_batch_size: false
    shuffle: true
    drop_last: false
checkpoint:
  enabled: true
  checkpoint_dir: PATH_TO_YOUR_CKPT_DIR
  model_save_format: safetensors
  save_consolidated: final
  diffusers_compatible: true
  restore_from: null
wandb:
  enable: false
  project: flux-finetuning
  mode: online
  name: run_1
dist_env:
  backend: "nccl"
  init_method: "env://"
  timeout_minutes: 30
seed: 42
ci:
  recipe_owner: someone
  time: "00:30:00"
]]
local am_path = tmp .. "/automodel.yaml"
do local f = assert(io.open(am_path, "wb")); f:write(automodel_yaml); f:close() end
T.raises(function() train.load_config(am_path, {}) end, "fsdp.dp_size = 8 does not match the world size 1",
    "an Automodel YAML: fsdp.dp_size 8 on one process is a clear error")
local am_ok, am = pcall(train.load_config, am_path, {{key = "fsdp.dp_size", text = "1"}})
T.ok(am_ok, "an Automodel YAML (Python _target_ values, TE/FSDP keys) validates with --fsdp.dp_size 1", am)
T.is(train.DATALOADER_TARGETS[am_ok and am.data.dataloader._target_ or ""], "cache",
    "Automodel's build_text_to_image_multiresolution_dataloader maps to nemo.data.build_dataloader")
T.ok(train.OPTIMIZER_TARGETS["torch.optim.AdamW"], "torch.optim.AdamW maps to nemo.optim.AdamW")
T.raises(function() train.run(am, {log = quiet}) end, "data.dataloader.cache_dir is required",
    "the placeholder PATH_TO_YOUR_DATA is a clear error before the 12B model is built")

local function raises_cfg(over, pattern, name)
    T.raises(function() train.validate(tiny(tmp .. "/x", over)) end, pattern, name)
end
raises_cfg({["optimizer.lrr"] = 1, ["foo"] = 2, ["data.dataloader.bar"] = 3},
    "unknown keys 'data.dataloader.bar', 'foo', 'optimizer.lrr'", "every unknown key named in one error")
raises_cfg({["optimizer.lrr"] = 1}, "known keys of optimizer: _target_, amsgrad, betas", "unknown key lists the known ones")
raises_cfg({["optimizer._target_"] = "torch.optim.SGD"}, "optimizer._target_ 'torch.optim.SGD' is not supported (known: nemo.optim.AdamW, torch.optim.AdamW)",
    "unknown optimizer target")
raises_cfg({["data.dataloader._target_"] = "my_pkg.build_loader"}, "data.dataloader._target_ 'my_pkg.build_loader' is not supported",
    "unknown dataloader target")
raises_cfg({["optim.learning_rate"] = 1e-4}, "'optim.learning_rate' -> 'optimizer.lr'", "removed optim.learning_rate")
raises_cfg({["optim.clip_grad"] = 1, ["optim.optimizer.weight_decay"] = 0.1},
    "'optim.clip_grad' -> 'clip_grad_norm.max_norm'; 'optim.optimizer' -> 'optimizer (with an explicit _target_",
    "removed optim.clip_grad and optim.optimizer, both named")
raises_cfg({["step_scheduler.log_every"] = 1}, "'step_scheduler.log_every' -> 'step_scheduler.log_remote_every_steps'",
    "removed step_scheduler.log_every")
raises_cfg({["optimizer.lr"] = "fast"}, "'optimizer.lr' must be a number, got string", "a wrong type names the key")
raises_cfg({["step_scheduler.max_steps"] = 0}, "step_scheduler.max_steps must be a positive integer", "max_steps 0")
raises_cfg({["step_scheduler.global_batch_size"] = 3},
    "step_scheduler.global_batch_size (3) must be a multiple of local_batch_size (2) x data-parallel size (1)",
    "global batch not divisible by local x dp")
raises_cfg({["step_scheduler.global_batch_size"] = 3}, "(e.g. global_batch_size 2 or global_batch_size 4)",
    "global batch not divisible: suggests the two nearest global batch sizes")
raises_cfg({["step_scheduler.global_batch_size"] = 1}, "(e.g. global_batch_size 2 or local_batch_size 1)",
    "global batch below local x dp: suggests one global batch size and a smaller local batch")
raises_cfg({["checkpoint.save_consolidated"] = "sometimes"}, "save_consolidated: 'sometimes' is not one of false, final, every",
    "bad save_consolidated")
raises_cfg({["checkpoint.max_recent_checkpoints"] = 0}, "max_recent_checkpoints must be unset or a positive integer",
    "max_recent_checkpoints 0")
raises_cfg({["wandb.enable"] = true}, "Weights & Biases logging is not available", "wandb.enable")
raises_cfg({["peft.dim"] = 8}, "model.model_type must be set when a peft block is given",
    "a peft block without model.model_type (LoRA itself: tests/lua/test_peft.lua)")
raises_cfg({["fsdp.dp_size"] = 1, ["ddp.dp_size"] = 1}, "'fsdp' and 'ddp' are mutually exclusive", "fsdp + ddp")
raises_cfg({["optimizer"] = json.null}, "the 'optimizer' section is required, for example:", "missing optimizer")
raises_cfg({device = "gpu"}, "device must be auto, cpu, cuda or cuda:N, got 'gpu'", "a bad device")
if not (nemo.cuda and nemo.cuda.is_available()) then
    T.raises(function() train.run(tiny(tmp .. "/cuda", {device = "cuda"}), {log = quiet}) end,
        "device 'cuda:0': no CUDA device", "device cuda without a GPU: a clear error before anything loads")
else
    T.skip("device cuda without a GPU", "this machine has a CUDA device")
end
T.is(train.consolidated_mode(true), "every", "save_consolidated true = every")
T.is(train.consolidated_mode(false), "false", "save_consolidated false")
T.is(train.consolidated_mode("final"), "final", "save_consolidated final")
T.is(train.consolidated_mode(nil), "final", "save_consolidated default final")
T.is(train.consolidated_mode("every"), "every", "save_consolidated every")

-- ==== the config audit: no key is silently ignored, no bad value reaches training ====

-- profiling and ci: real schemas (Automodel's torch-profiler block; its CI metadata keys)
raises_cfg({["profiling.typo_key"] = 1}, "unknown key 'profiling.typo_key'", "profiling: an unknown key is an error naming it")
raises_cfg({["profiling.torch_profiler.enabledd"] = true}, "unknown key 'profiling.torch_profiler.enabledd'",
    "profiling.torch_profiler: an unknown key is an error naming its path")
raises_cfg({["ci.whatever"] = 1}, "unknown key 'ci.whatever'", "ci: an unknown key is an error naming it")
raises_cfg({["profiling.enabled"] = "yes"}, "'profiling.enabled' must be a boolean", "profiling: a wrong type names the key")
do
    local cfg = tiny(tmp .. "/x", {profiling = {enabled = false, output_dir = "profile_default", wait_steps = 1,
        warmup_steps = 1, active_steps = 3, ["repeat"] = 1, ranks = {0}, record_shapes = true, profile_memory = true,
        with_stack = false, with_flops = false, row_limit = 40, torch_profiler = {enabled = false, ranks = "all"}},
        ci = {recipe_owner = "someone", time = "00:30:00", nodes = 1, node_multiplier = true, max_steps = 5,
              env_vars = {REQUIRE_FINITE_METRICS = "true"}, checkpoint_robustness = {hf_kl_threshold = 1e-3},
              known_issue_id = "AM-1", allow_failure = true, vllm_deploy = false, nightly = {["step_scheduler.max_steps"] = 5}}})
    local ok, err = pcall(train.validate, cfg)
    T.ok(ok, "Automodel's profiling keys (flat and under torch_profiler) and ci keys validate", err)
end

-- demo.transformer: the demo model's config fields, checked on every run before any cache lookup
raises_cfg({["demo.transformer.num_layerz"] = 2}, "unknown key 'demo.transformer.num_layerz'",
    "demo.transformer (flux): an unknown key is an error naming it")
raises_cfg({["demo.transformer.num_layers"] = "2"},
    "demo.transformer (FluxTransformer2DModel): config key 'num_layers' must be a non-negative integer",
    "demo.transformer: a wrong value type names the key")
raises_cfg({["demo.model"] = "sd3"}, "demo.model must be 'flux' or 'wan', got 'sd3'", "demo.model: an unknown model")
do
    local dir = tmp .. "/typo_demo"
    local cfg = tiny(dir, {["demo.transformer.num_layerz"] = 2})
    local _, _, base = train.demo_paths(cfg)
    for i = 1, 2 do
        T.raises(function() run(tiny(dir, {["demo.transformer.num_layerz"] = 2})) end,
            "unknown key 'demo.transformer.num_layerz'", "run " .. i .. " with demo.transformer.num_layerz: an error")
    end
    T.ok(not fs.exists(base) and not fs.exists(dir), "demo.transformer typo: no demo assets made, nothing trained")
end
for _, v in ipairs {{"--demo.transformer.num_layerz", "2", "unknown key 'demo.transformer.num_layerz'"},
                    {"--demo.transformer.axes_dims_rope", "[2, 2, 4]", "unknown key 'demo.transformer.axes_dims_rope'"},
                    {"--model.pipeline_spec.transformer_clss", "x", "unknown key 'model.pipeline_spec.transformer_clss'"}} do
    T.raises(function() train.load_config("recipes/wan_finetune.yaml", train.parse_args {v[1], v[2]}.overrides) end,
        v[3], "wan_finetune.yaml " .. v[1] .. " " .. v[2] .. ": an error naming the key")
end

-- model.pipeline_spec: checked in every mode (finetune does not use it)
raises_cfg({["model.pipeline_spec.transformer_clss"] = "x"}, "unknown key 'model.pipeline_spec.transformer_clss'",
    "finetune: a misspelt pipeline_spec key is an error naming it")
raises_cfg({["model.pipeline_spec.load_full_pipeline"] = "no"}, "'model.pipeline_spec.load_full_pipeline' must be a boolean",
    "pipeline_spec: a wrong type names the key")
T.ok(pcall(train.validate, tiny(tmp .. "/x", {["model.pipeline_spec"] = {transformer_cls = "FluxTransformer2DModel",
    subfolder = "transformer", load_full_pipeline = false}})), "finetune with a correct pipeline_spec validates")

-- dist_env.backend: the supported values
raises_cfg({["dist_env.backend"] = "nccll"}, "dist_env.backend 'nccll' is not one of nccl, mpi, gloo",
    "dist_env.backend nccll: an error naming the key and the allowed values")
raises_cfg({["dist_env.timeout_minutes"] = 0}, "dist_env.timeout_minutes must be > 0", "dist_env.timeout_minutes 0")
do
    local ok = true
    for _, b in ipairs {"nccl", "mpi", "gloo"} do ok = ok and pcall(train.validate, tiny(tmp .. "/x", {["dist_env.backend"] = b})) end
    T.ok(ok, "dist_env.backend nccl, mpi and gloo validate")
end

-- torch_dtype / compute_dtype: the names first (then the mixed-precision rule)
raises_cfg({["model.torch_dtype"] = "float33"},
    "model.torch_dtype: unknown dtype 'float33': use float32, bfloat16, float16 or float64",
    "torch_dtype float33: says the dtype is unknown and lists the accepted names (not a mixed-precision error)")
raises_cfg({["model.compute_dtype"] = "int64"}, "model.compute_dtype: unknown dtype 'int64'", "compute_dtype int64")
raises_cfg({["model.torch_dtype"] = "auto"}, "model.torch_dtype: 'auto' is not supported", "torch_dtype auto")
raises_cfg({["fsdp.dp_size"] = 1, ["fsdp.reduce_dtype"] = "bf17"}, "fsdp.reduce_dtype: unknown dtype 'bf17'", "fsdp.reduce_dtype bf17")
raises_cfg({["model.compute_dtype"] = "bfloat16"}, "model.compute_dtype (bfloat16) differs from model.torch_dtype (float32)",
    "mixed precision without an fsdp block: an error at validation")
T.ok(train.dtype_name("bf16", "k") == "bfloat16" and train.dtype_name("torch.float32", "k") == "float32" and
    train.dtype_name("half", "k") == "float16", "dtype aliases: bf16, torch.float32, half -> canonical names")
T.ok(pcall(train.validate, tiny(tmp .. "/x", {["model.torch_dtype"] = "fp32", ["model.compute_dtype"] = "torch.float32"})),
    "torch_dtype fp32 with compute_dtype torch.float32 is the same dtype, not mixed precision")

-- ==== the demo: created once, cached; metrics; loss goes down ====

local A = tmp .. "/A"
-- a demo folder no earlier run has filled, so this first run must create the assets
local function fresh_demo(dir) local c = tiny(dir); c.demo.dir = tmp .. "/demo-fresh"; return c end
logs = {}
local sA = run(fresh_demo(A))
local model_dir, cache_dir = train.demo_paths(fresh_demo(A))
T.ok(fs.isfile(model_dir .. "/model_index.json") and fs.isfile(model_dir .. "/transformer/config.json") and
    fs.isfile(model_dir .. "/transformer/diffusion_pytorch_model.safetensors"),
    "demo pipeline created (model_index.json, transformer/config.json, safetensors)")
T.ok(fs.isfile(cache_dir .. "/index.json"), "demo synthetic cache created")
local created = table.concat(logs, "\n"):find("creating a small FLUX") ~= nil
T.ok(created, "the first run says it creates the demo pipeline")
logs = {}
local sA2 = run(fresh_demo(tmp .. "/A2"))
T.ok(not table.concat(logs, "\n"):find("demo: ", 1, true), "a second run reuses the cached demo assets")
T.is(sA.steps, 10, "10 steps taken")

local mA = read_metrics(A .. "/metrics.jsonl")
T.is(#mA, 10, "metrics.jsonl: one line per step")
local ok_fields = true
for i, m in ipairs(mA) do
    if m.step ~= i - 1 or type(m.loss) ~= "number" or type(m.lr) ~= "number" or type(m.grad_norm) ~= "number" or
        type(m.epoch) ~= "number" or not (m.grad_norm > 0) then ok_fields = false end
end
T.ok(ok_fields, "metrics.jsonl: step 0..9 in order with loss, lr, grad_norm, epoch")
T.ok(mA[8].epoch == 0 and mA[9].epoch == 1, "metrics.jsonl: 8 steps per epoch (step 7 in epoch 0, step 8 in epoch 1)")
T.near(mA[1].lr, 1e-4, 1e-12, "lr of step 0 = init_lr = 0.1 x lr (warmup)")
T.near(mA[3].lr, 1e-3, 1e-12, "lr of step 2 = lr (end of the 2-step warmup)")
T.ok(mA[10].lr < mA[4].lr and mA[10].lr >= 1e-4, "cosine decay towards min_lr")

-- the other decay styles and the default clipping
run(tiny(tmp .. "/lin", {["lr_scheduler.lr_decay_style"] = "linear", ["checkpoint.enabled"] = false}))
local mLin = read_metrics(tmp .. "/lin/metrics.jsonl")
T.near(mLin[10].lr, 1e-4 + 0.125 * 9e-4, 1e-15, "linear decay: lr of step 9 = min_lr + (1 - 7/8) (lr - min_lr)")
run(tiny(tmp .. "/const", {["lr_scheduler.lr_decay_style"] = "constant", ["checkpoint.enabled"] = false}))
local mConst = read_metrics(tmp .. "/const/metrics.jsonl")
T.ok(mConst[3].lr == 1e-3 and mConst[10].lr == 1e-3 and mConst[1].lr == 1e-4, "constant: warmup, then lr")
local sClip = run(tiny(tmp .. "/clip", {["clip_grad_norm"] = json.null, ["step_scheduler.max_steps"] = 1,
    ["lr_scheduler.lr_warmup_steps"] = 0, ["checkpoint.enabled"] = false}))
local pre = read_metrics(tmp .. "/clip/metrics.jsonl")[1].grad_norm
local params = {}
for _, p in sClip.model:named_parameters() do params[#params + 1] = p end
T.ok(pre > 1, string.format("the first step's gradient norm (%.4f) is above 1", pre))
T.near(nemo.optim.grad_norm(params), 1.0, 1e-5, "clip_grad_norm default 1.0: the gradients are scaled to norm 1 (tol 1e-5)")

-- determinism: a second run with the same seed and config
local mA2 = read_metrics(tmp .. "/A2/metrics.jsonl")
local same = #mA2 == 10
for i = 1, #mA do if not mA2[i] or mA2[i].loss ~= mA[i].loss or mA2[i].grad_norm ~= mA[i].grad_norm then same = false end end
T.ok(same, "same seed and config: bitwise identical losses and grad norms (two runs)")
T.ok(file_eq(A .. "/epoch_1_step_9/model/model.safetensors", tmp .. "/A2/epoch_1_step_9/model/model.safetensors"),
    "same seed and config: bitwise identical final weights")
local sB = run(tiny(tmp .. "/seed8", {seed = 8}))
T.ok(sB.first_loss ~= sA.first_loss, "another seed gives other losses")
local _ = sA2

-- the loss goes down (a longer tiny run: 80 steps, batch 4)
local sL = run(tiny(tmp .. "/long", {["step_scheduler.max_steps"] = 80, ["step_scheduler.local_batch_size"] = 4,
    ["step_scheduler.global_batch_size"] = 4, ["step_scheduler.ckpt_every_steps"] = 1000, ["optimizer.lr"] = 3e-3,
    ["checkpoint.save_consolidated"] = false}))
local mL = read_metrics(tmp .. "/long/metrics.jsonl")
local first, last = 0, 0
for i = 1, 10 do first = first + mL[i].loss / 10; last = last + mL[#mL - 10 + i].loss / 10 end
T.ok(#mL == 80 and last < 0.8 * first, string.format("loss goes down: mean of the first 10 steps %.4f, of the last 10 %.4f (< 0.8x)",
    first, last))
local _ = sL

-- ==== checkpoint layout ====

local c9 = A .. "/epoch_1_step_9"
T.is(ckpt_names(A), "epoch_0_step_4,epoch_1_step_9", "checkpoints every ckpt_every_steps (step 4) and at the end (step 9)")
T.is(checkpoint.read_latest(A), "epoch_1_step_9", "LATEST names the last checkpoint")
for _, f in ipairs { "model/model.safetensors", "model/config.json", "optim/optim.safetensors", "optim/state.json",
                     "trainer.json", "config.yaml" } do
    T.ok(fs.isfile(c9 .. "/" .. f), "checkpoint holds " .. f)
end
local tr9 = json.read_file(c9 .. "/trainer.json")
T.ok(tr9.step == 9 and tr9.epoch == 1, "trainer.json: step 9, epoch 1")
T.ok(type(tr9.rng) == "table" and tr9.rng.flow and tr9.rng.flow.offset > 0 and tr9.rng.default ~= nil,
    "trainer.json: RNG states (flow-matching and default generators)")
T.ok(tr9.sampler and tr9.sampler.epoch == 1 and tr9.sampler.batch_index == 2, "trainer.json: sampler position (epoch 1, 2 batches)")
local ck_cfg = yaml.load_file(c9 .. "/config.yaml")
T.ok(ck_cfg.optimizer.lr == 1e-3 and ck_cfg.step_scheduler.max_steps == 10, "config.yaml: the run's config (YAML-readable)")
local ostate = json.read_file(c9 .. "/optim/state.json")
T.ok(ostate.scheduler and ostate.scheduler.num_steps == 10 and next(ostate.steps) ~= nil, "optim/state.json: schedule and AdamW step counts")
T.ok(not fs.isdir(A .. "/epoch_0_step_4/diffusers") and fs.isdir(c9 .. "/diffusers"),
    "save_consolidated final: the diffusers export only in the last checkpoint")

-- the diffusers export loads and gives the trained model's output
local exp = c9 .. "/diffusers"
local idx = json.read_file(exp .. "/model_index.json")
T.ok(idx._class_name == "FluxPipeline" and idx.transformer[2] == "FluxTransformer2DModel",
    "export: model_index.json names FluxPipeline and its transformer")
T.ok(fs.isfile(exp .. "/transformer/config.json") and fs.isfile(exp .. "/transformer/diffusion_pytorch_model.safetensors"),
    "export: transformer/config.json + diffusion_pytorch_model.safetensors")
local pipe = pipeline.NeMoAutoDiffusionPipeline.from_pretrained(exp, {torch_dtype = "float32", device = "cpu"})
local Flux = pipeline._import_diffusers_class("FluxTransformer2DModel")
local direct = Flux.from_pretrained(exp .. "/transformer", {torch_dtype = "float32"})
local fm = FM.FlowMatching(tiny(A).flow_matching)
local batch = require("nemo.data").build_dataloader {cache_dir = cache_dir, batch_size = 4, seed = 1}:iter()()
local function out_of(model)
    return nemo.no_grad(function()
        local loss, o = fm:step(model, batch, {generator = nemo.Generator(5), compute_dtype = "float32"})
        return loss:item(), o.pred
    end)
end
local l_tr, p_tr = out_of(sA.model)
local l_pipe, p_pipe = out_of(pipe.transformer)
local l_dir, p_dir = out_of(direct)
T.close(p_pipe, p_tr, 0, 0, "export via NeMoAutoDiffusionPipeline.from_pretrained: same prediction as the trained model (bitwise)")
T.close(p_dir, p_tr, 0, 0, "export via FluxTransformer2DModel.from_pretrained: same prediction (bitwise)")
T.ok(l_pipe == l_tr and l_dir == l_tr, "export: same loss as the trained model")
local l_base = out_of(pipeline.NeMoAutoDiffusionPipeline.from_pretrained(model_dir, {torch_dtype = "float32", device = "cpu"}).transformer)
T.ok(l_base ~= l_tr, "the export holds the trained weights, not the demo's initial ones")

-- ==== resume: 10 steps == 5 steps + resume + 5 steps, bitwise ====

local function losses_equal(m, ref, from, to)
    local byref = {}
    for _, r in ipairs(ref) do byref[r.step] = r end
    local n = 0
    for _, r in ipairs(m) do
        if r.step >= from and r.step <= to then
            if not byref[r.step] or byref[r.step].loss ~= r.loss or byref[r.step].grad_norm ~= r.grad_norm or
                byref[r.step].lr ~= r.lr then return false end
            n = n + 1
        end
    end
    return n == to - from + 1
end

-- restore_from by path (a checkpoint of another run's folder)
local B = tmp .. "/B"
local sRB = run(tiny(B, {["checkpoint.restore_from"] = A .. "/epoch_0_step_4"}))
local mB = read_metrics(B .. "/metrics.jsonl")
T.ok(sRB.resumed_from == A .. "/epoch_0_step_4" and sRB.steps == 5, "restore_from by path: resumes at step 5, takes 5 steps")
T.ok(#mB == 5 and losses_equal(mB, mA, 5, 9), "restore_from by path: losses, grad norms and lr of steps 5..9 bitwise equal to the uninterrupted run")
T.ok(file_eq(B .. "/epoch_1_step_9/model/model.safetensors", c9 .. "/model/model.safetensors"),
    "restore_from by path: final weights bitwise equal")
T.ok(file_eq(B .. "/epoch_1_step_9/optim/optim.safetensors", c9 .. "/optim/optim.safetensors"),
    "restore_from by path: final optimizer state bitwise equal")

-- auto-resume from LATEST after an interruption
local C = tmp .. "/C"
local sC1 = run(tiny(C), {stop_after = 5})
T.ok(sC1.stopped and sC1.steps == 5 and checkpoint.read_latest(C) == "epoch_0_step_4",
    "interrupted after 5 steps: checkpoint epoch_0_step_4, LATEST names it")
T.ok(not fs.isdir(C .. "/epoch_0_step_4/diffusers"), "an interrupted run writes no final export")
local sC2 = run(tiny(C))
local mC = read_metrics(C .. "/metrics.jsonl")
T.is(sC2.resumed_from, C .. "/epoch_0_step_4", "auto-resume from LATEST")
T.ok(#mC == 10 and losses_equal(mC, mA, 0, 9), "5 steps + auto-resume + 5 steps: metrics of steps 0..9 bitwise equal to 10 steps")
T.ok(file_eq(C .. "/epoch_1_step_9/model/model.safetensors", c9 .. "/model/model.safetensors"),
    "5 + resume + 5: final weights bitwise equal to 10 steps")
local sC3 = run(tiny(C))
T.ok(sC3.finished and sC3.steps == 0, "a finished run resumed again does nothing")

-- restore_from by name, in the run's own folder (a rerun of steps 5..9 from an older checkpoint)
local D = tmp .. "/D"
fs.copy_tree(A, D)
local sD = run(tiny(D, {["checkpoint.restore_from"] = "epoch_0_step_4"}))
local mD = read_metrics(D .. "/metrics.jsonl")
T.ok(sD.resumed_from == D .. "/epoch_0_step_4", "restore_from by name under checkpoint_dir")
T.ok(#mD == 10 and losses_equal(mD, mA, 0, 9), "restore_from by name: metrics.jsonl rewritten from step 5 (no duplicate lines), equal")
T.ok(file_eq(D .. "/epoch_1_step_9/model/model.safetensors", c9 .. "/model/model.safetensors"),
    "restore_from by name: final weights bitwise equal")
T.raises(function() run(tiny(D, {["checkpoint.restore_from"] = "epoch_3_step_99"})) end,
    "checkpoint.restore_from: no checkpoint at 'epoch_3_step_99'", "restore_from naming no checkpoint is an error")
T.raises(function() run(tiny(D, {["checkpoint.restore_from"] = D .. "/LATEST", ["demo.transformer.num_layers"] = 2})) end, "written for another model config than this run's (num_layers = 1 there, 2 here)",
    "resuming a checkpoint of another model config is an error naming the difference")

-- resume at an epoch boundary (the checkpoint after the last step of epoch 0)
local E = tmp .. "/E"
local sE1 = run(tiny(E), {stop_after = 8})
local trE = json.read_file(E .. "/epoch_0_step_7/trainer.json")
T.ok(sE1.stopped and trE.step == 7 and trE.epoch == 0 and trE.sampler.epoch == 1 and trE.sampler.batch_index == 0,
    "checkpoint after the last step of epoch 0: named epoch_0_step_7, next position epoch 1 batch 0")
run(tiny(E))
local mE = read_metrics(E .. "/metrics.jsonl")
T.ok(#mE == 10 and losses_equal(mE, mA, 0, 9) and mE[9].epoch == 1, "resume at an epoch boundary: steps 8..9 in epoch 1, bitwise equal")

-- thread count: 1 vs 2 threads (a model big enough for the parallel kernels: 64-wide, 72 tokens, batch 8)
local function mid(dir, over)
    local o = {["demo.transformer"] = {num_layers = 1, num_single_layers = 2, attention_head_dim = 32, num_attention_heads = 2,
        in_channels = 64, joint_attention_dim = 32, pooled_projection_dim = 32, axes_dims_rope = {8, 12, 12},
        guidance_embeds = true}, ["demo.samples"] = 16, ["demo.resolutions"] = "16x16", ["demo.text_len"] = 8,
        ["step_scheduler.local_batch_size"] = 8, ["step_scheduler.global_batch_size"] = 8, ["step_scheduler.max_steps"] = 3,
        ["checkpoint.save_consolidated"] = false}
    for k, v in pairs(over or {}) do o[k] = v end
    return tiny(dir, o)
end
local threads0 = nemo.get_num_threads()
nemo.set_num_threads(1)
run(mid(tmp .. "/th1"))
nemo.set_num_threads(2)
run(mid(tmp .. "/th2"))
nemo.set_num_threads(threads0)
local m1, m2 = read_metrics(tmp .. "/th1/metrics.jsonl"), read_metrics(tmp .. "/th2/metrics.jsonl")
T.ok(#m1 == 3 and losses_equal(m2, m1, 0, 2), "nemo.set_num_threads(1) vs 2: bitwise identical losses and grad norms")
T.ok(file_eq(tmp .. "/th1/epoch_1_step_2/model/model.safetensors", tmp .. "/th2/epoch_1_step_2/model/model.safetensors"),
    "1 vs 2 threads: bitwise identical weights")

-- ==== checkpoints: epochs, retention, consolidated export, atomicity ====

local sEp = run(tiny(tmp .. "/ep", {["step_scheduler.max_steps"] = json.null, ["step_scheduler.num_epochs"] = 2,
    ["step_scheduler.ckpt_every_steps"] = 100, ["step_scheduler.save_checkpoint_every_epoch"] = true}))
T.is(sEp.total, 16, "num_epochs 2 without max_steps: 2 x 8 steps")
T.is(ckpt_names(tmp .. "/ep"), "epoch_0_step_7,epoch_1_step_15", "save_checkpoint_every_epoch: a checkpoint at each epoch end")
run(tiny(tmp .. "/epdef", {["step_scheduler.save_checkpoint_every_epoch"] = json.null, ["checkpoint.save_consolidated"] = false}))
T.is(ckpt_names(tmp .. "/epdef"), "epoch_0_step_4,epoch_0_step_7,epoch_1_step_9",
    "save_checkpoint_every_epoch defaults to true (Automodel): every 5 steps, at the epoch end, at the end")
local sM = run(tiny(tmp .. "/ms", {["step_scheduler.num_epochs"] = json.null, ["step_scheduler.max_steps"] = 5,
    ["step_scheduler.ckpt_every_steps"] = 100}))
T.ok(sM.total == 5 and sM.steps == 5, "max_steps 5 without num_epochs: 5 steps")
local sN = run(tiny(tmp .. "/ne", {["step_scheduler.num_epochs"] = 1, ["step_scheduler.max_steps"] = 100,
    ["step_scheduler.ckpt_every_steps"] = 100}))
T.ok(sN.total == 8 and sN.steps == 8 and ckpt_names(tmp .. "/ne") == "epoch_0_step_7",
    "num_epochs 1 with max_steps 100: the epoch ends training (8 steps), final checkpoint written")

run(tiny(tmp .. "/keep", {["step_scheduler.ckpt_every_steps"] = 2, ["checkpoint.max_recent_checkpoints"] = 2,
    ["checkpoint.save_consolidated"] = "every"}))
T.is(ckpt_names(tmp .. "/keep"), "epoch_0_step_7,epoch_1_step_9", "max_recent_checkpoints 2: only the two newest are kept")
T.is(checkpoint.read_latest(tmp .. "/keep"), "epoch_1_step_9", "max_recent_checkpoints: LATEST still names the newest")
T.ok(fs.isdir(tmp .. "/keep/epoch_0_step_7/diffusers") and fs.isdir(tmp .. "/keep/epoch_1_step_9/diffusers"),
    "save_consolidated every: every checkpoint holds the diffusers export")
local sF = run(tiny(tmp .. "/noexp", {["checkpoint.save_consolidated"] = false}))
T.ok(sF.diffusers == nil and not fs.isdir(tmp .. "/noexp/epoch_1_step_9/diffusers"), "save_consolidated false: no export")
run(tiny(tmp .. "/off", {["checkpoint.enabled"] = false}))
T.ok(#checkpoint.list(tmp .. "/off") == 0 and #read_metrics(tmp .. "/off/metrics.jsonl") == 10,
    "checkpoint.enabled false: no checkpoints, metrics still written")

-- atomicity: a leftover *.incomplete folder (even with every file) is never taken for a checkpoint
local G = tmp .. "/G"
fs.mkdirs(G)
fs.copy_tree(A .. "/epoch_0_step_4", G .. "/epoch_0_step_4")
fs.copy_tree(c9, G .. "/epoch_1_step_9.incomplete")
T.is(checkpoint.latest(G), G .. "/epoch_0_step_4", "no LATEST: the newest complete checkpoint, not the *.incomplete one")
local f = assert(io.open(G .. "/LATEST", "wb")); f:write("epoch_1_step_9.incomplete\n"); f:close()
T.is(checkpoint.latest(G), G .. "/epoch_0_step_4", "LATEST naming an *.incomplete folder is not followed")
f = assert(io.open(G .. "/LATEST", "wb")); f:write("epoch_7_step_70\n"); f:close()
T.is(checkpoint.latest(G), G .. "/epoch_0_step_4", "LATEST naming a missing folder falls back to the newest complete one")
T.raises(function() checkpoint.resolve("epoch_1_step_9.incomplete", G) end, "is an incomplete checkpoint",
    "restore_from naming an *.incomplete folder is an error")
local sG = run(tiny(G))
T.ok(sG.resumed_from == G .. "/epoch_0_step_4" and not fs.exists(G .. "/epoch_1_step_9.incomplete"),
    "a run resumes from the complete checkpoint and removes the leftover *.incomplete folder")
T.ok(checkpoint.read_latest(G) == "epoch_1_step_9" and checkpoint.is_complete(G .. "/epoch_1_step_9"),
    "LATEST names a complete checkpoint after the run")
local mG = read_metrics(G .. "/metrics.jsonl")
T.ok(losses_equal(mG, mA, 5, 9), "resuming past the leftover gives the uninterrupted run's losses")

-- ==== gradient accumulation: global 4 = local 2 x 2 micro-steps vs local 4 x 1 ====
-- The random draws are replayed per sample id (opts.draws), and the data unshuffled, so both runs
-- see the same samples, noise and sigmas; only the summation order differs.
local function draws_by_id(b)
    local lat = b.image_latents
    local B = lat.shape[1]
    local normal, noise = {}, {}
    for i, id in ipairs(b.ids) do
        local g = nemo.Generator(1000 + tonumber(id))
        normal[i] = nemo.randn({1}, {generator = g})
        noise[i] = nemo.randn({1, lat.shape[2], lat.shape[3], lat.shape[4]}, {generator = g})
    end
    local _ = B
    return {normal = nemo.cat(normal, 0), noise = nemo.cat(noise, 0)}
end
local function acc_run(dir, local_bs)
    return run(tiny(dir, {["step_scheduler.local_batch_size"] = local_bs, ["step_scheduler.global_batch_size"] = 4,
        ["step_scheduler.max_steps"] = 1, ["data.dataloader.shuffle"] = false, ["flow_matching.cfg_dropout_prob"] = 0.0,
        ["clip_grad_norm.max_norm"] = 1e9, ["checkpoint.enabled"] = false, ["lr_scheduler.lr_warmup_steps"] = 0}),
        {draws = draws_by_id})
end
local s41 = acc_run(tmp .. "/acc41", 4)
local s22 = acc_run(tmp .. "/acc22", 2)
T.ok(s41.grad_acc == 1 and s22.grad_acc == 2, "grad_acc = global / (local x dp): 1 and 2")
local ma, mb = read_metrics(tmp .. "/acc41/metrics.jsonl")[1], read_metrics(tmp .. "/acc22/metrics.jsonl")[1]
T.near(mb.loss, ma.loss, 1e-6 * ma.loss, "grad-acc: step-0 loss, local 2 x 2 vs local 4 x 1 (rtol 1e-6)")
T.near(mb.grad_norm, ma.grad_norm, 1e-5 * ma.grad_norm, "grad-acc: gradient norm (rtol 1e-5)")
local ga, gb, wa, wb = {}, {}, {}, {}
for name, p in s41.model:named_parameters() do ga[name] = p.grad; wa[name] = p end
for name, p in s22.model:named_parameters() do gb[name] = p.grad; wb[name] = p end
local worst_g, worst_w, nparams = 0, 0, 0
nemo.no_grad(function() for name, g in pairs(ga) do
    nparams = nparams + 1
    local d = (gb[name] - g):abs():max():item()
    local scale = g:abs():max():item() + 1e-30
    worst_g = math.max(worst_g, d / scale)
    worst_w = math.max(worst_w, (wb[name] - wa[name]):abs():max():item())
end end)
T.ok(nparams > 0 and worst_g <= 1e-5, string.format("grad-acc: every parameter's gradient equal within 1e-5 x its max " ..
    "(worst %.2g)", worst_g))
-- AdamW's first update is lr * g / (|g| + eps): where |g| is within a few eps of 0, a 1e-6 relative
-- difference in g moves it by up to ~1e-3 x lr
T.ok(worst_w <= 1e-3 * 1e-3, string.format("grad-acc: weights after one AdamW step (lr 1e-3) equal within 1e-3 x lr " ..
    "(worst %.2g)", worst_w))

-- ==== bad input: each a clear error before training ====

local function no_training(dir) return not fs.isfile(dir .. "/metrics.jsonl") and #checkpoint.list(dir) == 0 end
local function bad(over, pattern, name, mk)
    local dir = tmp .. "/bad" .. tostring(#logs) .. tostring(math.random(1e9))
    local cfg = tiny(dir, over)
    if mk then mk(cfg) end
    T.raises(function() run(cfg) end, pattern, name)
    T.ok(no_training(dir), name .. ": nothing trained, no checkpoint, no metrics")
end
local demo_off = {["demo.enabled"] = false, ["model.pretrained_model_name_or_path"] = model_dir}
local function with(t, more) local o = deepcopy(t); for k, v in pairs(more) do o[k] = v end; return o end
bad(with(demo_off, {["data.dataloader.cache_dir"] = tmp .. "/no_such_cache"}), "data.dataloader.cache_dir: no folder at '" ..
    tmp .. "/no_such_cache'", "a missing data folder")
-- an empty dataset: a cache whose index lists no samples
local empty = tmp .. "/empty_cache"
fs.mkdirs(empty)
json.write_file(empty .. "/index.json", {format = "nemo-lua.latent_cache", version = 1, model_type = "flux",
    data_type = "image", shards = json.array({}), samples = json.array({})})
bad(with(demo_off, {["data.dataloader.cache_dir"] = empty}), "the dataset is empty", "an empty dataset")
-- fewer samples than one batch
local few = tmp .. "/few_cache"
synthetic.make {out = few, samples = 1, model = "flux", resolutions = "8x8", channels = 4, text_len = 4, text_dim = 16,
                pooled_dim = 16, seed = 1}
bad(with(demo_off, {["data.dataloader.cache_dir"] = few}), "no batch can be formed", "a dataset smaller than one batch")
-- latents that do not fit the model: 8 channels (32 packed) for in_channels 16
local wide = tmp .. "/wide_cache"
synthetic.make {out = wide, samples = 4, model = "flux", resolutions = "8x8", channels = 8, text_len = 4, text_dim = 16,
                pooled_dim = 16, seed = 1}
bad(with(demo_off, {["data.dataloader.cache_dir"] = wide}),
    "the latents have 8 channels, packed 2x2 that is 32 features per token, but the model's in_channels is 16",
    "latents with the wrong channel count for the model")
local txt = tmp .. "/text_cache"
synthetic.make {out = txt, samples = 4, model = "flux", resolutions = "8x8", channels = 4, text_len = 4, text_dim = 24,
                pooled_dim = 16, seed = 1}
bad(with(demo_off, {["data.dataloader.cache_dir"] = txt}), "the text embeddings are 24 wide, the model's joint_attention_dim is 16",
    "text embeddings of the wrong width for the model")
-- a shard whose latents disagree with the index
local lie = tmp .. "/lie_cache"
synthetic.make {out = lie, samples = 4, model = "flux", resolutions = "8x8", channels = 4, text_len = 4, text_dim = 16,
                pooled_dim = 16, seed = 1}
local lidx = json.read_file(lie .. "/index.json")
for _, s in ipairs(lidx.samples) do s.bucket = {8, 6} end
json.write_file(lie .. "/index.json", lidx)
bad(with(demo_off, {["data.dataloader.cache_dir"] = lie}), "latents have shape (4, 8, 8), the index says (4, 8, 6)",
    "a shard whose latent shape does not match its index")
bad({["step_scheduler.global_batch_size"] = 3}, "must be a multiple of local_batch_size (2)", "batch sizes that do not divide")
bad({["checkpoint.restore_from"] = A .. "/epoch_0_step_4", ["demo.transformer.num_layers"] = 2},
    "was written for another model config than this run's (num_layers = 1 there, 2 here)",
    "restore_from a checkpoint of another model config")
bad({["flow_matching.adapter_type"] = "simple", ["flow_matching.adapter_kwargs"] = json.null}, "set flow_matching.adapter_type: flux", "the simple adapter with a FLUX model")
bad(with(demo_off, {["model.pretrained_model_name_or_path"] = tmp .. "/no_model", ["data.dataloader.cache_dir"] = cache_dir}),
    "model.pretrained_model_name_or_path: model '" .. tmp .. "/no_model' not found", "a missing model folder")
-- a warmup as long as the run (Automodel asserts warmup < decay steps too): the message names the key to change
bad({["step_scheduler.max_steps"] = 2}, "lr_scheduler.lr_warmup_steps (2) must be below lr_decay_steps, which is not " ..
    "set and so is this run's 2 steps: lower it (e.g. --lr_scheduler.lr_warmup_steps 0)",
    "lr_warmup_steps 2 in a 2-step run: an error naming --lr_scheduler.lr_warmup_steps")
bad({["lr_scheduler.lr_decay_steps"] = 2}, "or raise --lr_scheduler.lr_decay_steps above 2",
    "lr_warmup_steps 2 with lr_decay_steps 2: an error naming both keys")
-- the shipped Wan recipe as a 3-step smoke run: its warmup is the default (a tenth of the run)
do
    local wdir = tmp .. "/wan3"
    local ok, s = pcall(function()
        return run(train.load_config("recipes/wan_finetune.yaml", train.parse_args {"--step_scheduler.max_steps", "3",
            "--demo.samples", "8", "--demo.dir", tmp .. "/wandemo", "--step_scheduler.local_batch_size", "2",
            "--step_scheduler.global_batch_size", "2", "--checkpoint.checkpoint_dir", wdir,
            "--checkpoint.save_consolidated", "false"}.overrides))
    end)
    T.ok(ok and s.steps == 3, "recipes/wan_finetune.yaml --step_scheduler.max_steps 3 trains 3 steps", not ok and s or nil)
end

-- ==== the NaN guard ====

local N = tmp .. "/nan"
T.raises(function() run(tiny(N, {["optimizer.lr"] = 1e30, ["step_scheduler.ckpt_every_steps"] = 1})) end,
    "loss is %-?nan at step 1 .*no checkpoint was written from this state; the last good checkpoint is " .. N .. "/epoch_0_step_0",
    "lr 1e30: the NaN loss stops training, naming step 1 and the last good checkpoint")
T.ok(not fs.exists(N .. "/epoch_0_step_1") and not fs.exists(N .. "/epoch_0_step_1.incomplete"), "NaN: no checkpoint folder for step 1")
T.is(checkpoint.read_latest(N), "epoch_0_step_0", "NaN: LATEST still names the previous good checkpoint")
T.is(#read_metrics(N .. "/metrics.jsonl"), 1, "NaN: metrics.jsonl ends with the last good step")
local N2 = tmp .. "/inf"
T.raises(function() run(tiny(N2, {["optimizer.lr"] = 1e39, ["step_scheduler.ckpt_every_steps"] = 1})) end,
    "is not finite after step 0: training stopped; no checkpoint was written", "lr 1e39: non-finite weights after step 0 stop before the save")
T.ok(#checkpoint.list(N2) == 0 and checkpoint.read_latest(N2) == nil, "non-finite weights: no checkpoint, no LATEST")
-- a poisoned parameter in the pretrained weights
local poisoned = tmp .. "/poisoned"
local pp = pipeline.NeMoAutoDiffusionPipeline.from_pretrained(model_dir, {torch_dtype = "float32", device = "cpu"})
nemo.no_grad(function() pp.transformer.proj_out.weight:narrow(0, 0, 1):fill_(0 / 0) end)
pp:save_pretrained(poisoned)
T.raises(function() run(tiny(tmp .. "/pois", with(demo_off, {["model.pretrained_model_name_or_path"] = poisoned,
    ["data.dataloader.cache_dir"] = cache_dir}))) end, "loss is %-?nan at step 0", "a NaN weight: the loss at step 0 is NaN, named")
T.ok(#checkpoint.list(tmp .. "/pois") == 0, "a NaN weight: no checkpoint written")

-- ==== progress bar and plain lines ====

T.is(train.format_time(7), "0m07s", "format_time 7 s")
T.is(train.format_time(754), "12m34s", "format_time 754 s")
T.is(train.format_time(7500), "2h05m", "format_time 2 h")
T.is(train.format_time(0 / 0), "?", "format_time unknown")
T.is(train.format_progress {done = 12, total = 48, loss = 1.23456, lr = 3e-4, sec_per_step = 0.0712, eta = 2.6, width = 8},
    "[##......] 12/48  loss 1.2346  lr 3.00e-04  0.071 s/step  ETA 0m03s", "format_progress: bar, step, loss, lr, s/step, ETA")
T.is(train.format_log_line {step = 11, total = 48, epoch = 1, loss = 1.23456, lr = 3e-4, grad_norm = 0.5, sec_per_step = 0.0712,
    eta = 65}, "step 11/48 epoch 1 loss 1.234560 lr 3.000e-04 grad_norm 0.5000 0.071 s/step ETA 1m05s",
    "format_log_line: step, epoch, loss, lr, grad_norm, s/step, ETA")

-- the command line: a YAML of the tiny config, run by the recipe (XDG_CACHE_HOME = the test folder)
local ty = tmp .. "/tiny.yaml"
local tcfg = tiny("unused")
tcfg.demo.dir = nil
json.write_file(ty, tcfg)   -- JSON is YAML
local env = "XDG_CACHE_HOME='" .. tmp .. "/xdg' OMP_NUM_THREADS=1 "
local out, rc = sh(env .. "./nemo-lua recipes/flux_finetune.lua -c " .. ty .. " --checkpoint.checkpoint_dir " .. tmp ..
    "/cli --step_scheduler.max_steps 3 --optimizer.lr 3e-4")
T.ok(rc == 0 and out:find("step 0/3 epoch 0 loss %d") and out:find("s/step ETA") and not out:find("\r", 1, true),
    "not a terminal: plain log lines (step, epoch, loss, lr, grad_norm, s/step, ETA), no bar", out)
T.ok(fs.isfile(tmp .. "/xdg/nemo-lua/demo/" .. (train.demo_paths(tcfg):match("(flux%-%x+)/pipeline$")) .. "/pipeline/model_index.json"),
    "the demo assets go under $XDG_CACHE_HOME/nemo-lua/demo")
local mcli = read_metrics(tmp .. "/cli/metrics.jsonl")
T.ok(#mcli == 3 and math.abs(mcli[1].lr - 3e-5) < 1e-15, "--step_scheduler.max_steps 3 --optimizer.lr 3e-4 took effect (3 steps, init lr 3e-5)")
local out2 = sh(env .. "OMP_NUM_THREADS=2 ./nemo-lua recipes/flux_finetune.lua -c " .. ty .. " --checkpoint.checkpoint_dir " ..
    tmp .. "/cli2 --step_scheduler.max_steps 3 --optimizer.lr 3e-4")
local _ = out2
T.ok(losses_equal(read_metrics(tmp .. "/cli2/metrics.jsonl"), mcli, 0, 2), "OMP_NUM_THREADS=1 vs 2: bitwise identical losses")
if fs.isfile("/usr/bin/script") or os.execute("command -v script >/dev/null 2>&1") == 0 then
    local pty = sh("script -qec \"" .. env .. "./nemo-lua recipes/flux_finetune.lua -c " .. ty ..
        " --checkpoint.checkpoint_dir " .. tmp .. "/pty --step_scheduler.max_steps 3\" /dev/null")
    T.ok(pty:find("\r[########################] 3/3  loss", 1, true) and pty:find("s/step  ETA", 1, true) and
        not pty:find("step 0/3 epoch", 1, true), "on a terminal (script -qc): a progress bar redrawn with \\r, no plain lines", pty)
else
    T.skip("progress bar on a pseudo-terminal", "no `script` command")
end
local eout, erc = sh(env .. "./nemo-lua recipes/flux_finetune.lua -c " .. ty .. " --optimizer.lrr 1")
T.ok(erc == 1 and eout:find("nemo-lua: config: unknown key 'optimizer.lrr'", 1, true) and not eout:find("traceback"),
    "a config error: exit status 1, the message alone (no traceback)", eout)
local hout, hrc = sh("./nemo-lua recipes/flux_finetune.lua --help")
T.ok(hrc == 0 and hout:find("usage: nemo-lua recipes/flux_finetune.lua", 1, true), "--help prints the usage")

-- the shipped finetune recipe as it is, shortened: its demo transformer, 64 samples, 30 steps
local dout, drc = sh("XDG_CACHE_HOME='" .. tmp .. "/xdg' ./nemo-lua recipes/flux_finetune.lua --step_scheduler.max_steps 30 " ..
    "--demo.samples 64 --checkpoint.checkpoint_dir " .. tmp .. "/shipped")
local mS = read_metrics(tmp .. "/shipped/metrics.jsonl")
local s_first, s_last = 0, 0
for i = 1, 5 do s_first = s_first + (mS[i] and mS[i].loss or 0) / 5; s_last = s_last + (mS[#mS - 5 + i] and mS[#mS - 5 + i].loss or 0) / 5 end
T.ok(drc == 0 and #mS == 30 and dout:find("creating a small FLUX%-architecture pipeline") and
    fs.isfile((checkpoint.latest(tmp .. "/shipped") or "?") .. "/diffusers/model_index.json"),
    "the shipped flux_finetune.yaml runs end to end (demo created, 30 steps, final export)", dout)
T.ok(s_last < 0.9 * s_first, string.format("shipped demo: the loss falls (mean of steps 0-4 %.4f, of steps 25-29 %.4f)",
    s_first, s_last))

-- ==== ema: an exponential moving average of the weights ====
do
    local Ed = tmp .. "/ema"
    local cfg = tiny(Ed, {["ema.decay"] = 0.95, ["step_scheduler.max_steps"] = 6, ["step_scheduler.ckpt_every_steps"] = 3})
    local s1 = run(cfg)
    local last = Ed .. "/epoch_0_step_5"
    local m = read_metrics(Ed .. "/metrics.jsonl")
    local st = json.read_file(last .. "/ema/state.json")
    T.ok(s1.steps == 6 and fs.isfile(last .. "/ema/model/model.safetensors") and st.optimization_step == 6 and
         m[1].ema_decay == 0 and math.abs(m[6].ema_decay - 6 / 15) < 1e-12,
        "ema: the checkpoint holds ema/ (the averages, state.json: 6 steps); metrics.jsonl logs each step's decay " ..
        "(0, then (1 + k) / (10 + k))", string.format("steps %s, step %s, decays %s %s", tostring(s1.steps),
        tostring(st.optimization_step), tostring(m[1] and m[1].ema_decay), tostring(m[6] and m[6].ema_decay)))
    -- the averages replayed from the weights of each step: a run that stops after every step
    local ema_w = nemo.load_file(last .. "/ema/model/model.safetensors")
    local trained = nemo.load_file(last .. "/model/model.safetensors")
    -- every tensor of a checkpoint's diffusers export (any number of shard files)
    local function export_of(ck)
        local out = {}
        for _, f in ipairs(fs.list(ck .. "/diffusers/transformer")) do
            if f:match("%.safetensors$") then
                for k, v in pairs(nemo.load_file(ck .. "/diffusers/transformer/" .. f)) do out[k] = v end
            end
        end
        return out
    end
    local export = export_of(last)
    local same_ema, differs, n = 0, 0, 0
    for k, v in pairs(ema_w) do
        n = n + 1
        same_ema = math.max(same_ema, (T.maxdiff(export[k], v)))
        differs = math.max(differs, (T.maxdiff(trained[k], v)))
    end
    T.ok(n > 0 and same_ema == 0 and differs > 0, string.format("ema: the diffusers export holds the averages (%d " ..
        "tensors, bitwise), which differ from the trained weights the checkpoint keeps for resuming", n),
        string.format("export vs ema %g, trained vs ema %g", same_ema, differs))
    -- replay: the average of the per-step weights, from a run that stops after every step
    local R = tmp .. "/ema_replay"
    local weights = {}
    for k = 1, 6 do
        run(tiny(R, {["ema.decay"] = 0.95, ["step_scheduler.max_steps"] = 6, ["step_scheduler.ckpt_every_steps"] = 1}),
            {stop_after = 1})
        weights[k] = nemo.load_file(R .. "/" .. checkpoint.read_latest(R) .. "/model/model.safetensors")
    end
    local worst = 0
    for k, _ in pairs(ema_w) do
        local s
        for step = 1, 6 do
            local d = step == 1 and 0 or math.min(0.95, step / (9 + step))
            local w = weights[step][k]:double()
            s = s and (s - (s - w) * (1 - d)) or w:clone()
        end
        worst = math.max(worst, (T.maxdiff(ema_w[k]:double(), s)) / math.max(1e-30, s:abs():max():item()))
    end
    T.ok(worst < 1e-6, string.format("ema: the saved averages equal the average replayed from each step's weights " ..
        "(a run stopped and resumed after every step; %.1e relative, tolerance 1e-6)", worst))
    -- stop and resume: the averages continue bitwise
    local S = tmp .. "/ema_stop"
    run(tiny(S, {["ema.decay"] = 0.95, ["step_scheduler.max_steps"] = 6, ["step_scheduler.ckpt_every_steps"] = 3}),
        {stop_after = 3})
    run(tiny(S, {["ema.decay"] = 0.95, ["step_scheduler.max_steps"] = 6, ["step_scheduler.ckpt_every_steps"] = 3}))
    T.ok(file_eq(S .. "/epoch_0_step_5/ema/model/model.safetensors", last .. "/ema/model/model.safetensors") and
         file_eq(S .. "/epoch_0_step_5/model/model.safetensors", last .. "/model/model.safetensors"),
        "ema: 3 steps, stop, resume, 3 steps == 6 steps, averages and weights bitwise")
    -- a checkpoint without ema resumed with it: the averages start from the loaded weights
    local N = tmp .. "/ema_late"
    run(tiny(N, {["step_scheduler.max_steps"] = 6, ["step_scheduler.ckpt_every_steps"] = 3}), {stop_after = 3})
    local sN = run(tiny(N, {["ema.decay"] = 0.95, ["step_scheduler.max_steps"] = 6, ["step_scheduler.ckpt_every_steps"] = 3}))
    local stN = json.read_file(N .. "/epoch_0_step_5/ema/state.json")
    T.ok(sN.steps == 3 and stN.optimization_step == 3, "ema turned on at a resume: the averages start from the " ..
        "checkpoint's weights (3 steps averaged)", string.format("steps %s, step %s", tostring(sN.steps),
        tostring(stN.optimization_step)))
    local noexp = tmp .. "/ema_noexport"
    run(tiny(noexp, {["ema.decay"] = 0.95, ["ema.export"] = false, ["step_scheduler.max_steps"] = 3,
        ["step_scheduler.ckpt_every_steps"] = 3}))
    local ex2 = export_of(noexp .. "/epoch_0_step_2")
    local tw = nemo.load_file(noexp .. "/epoch_0_step_2/model/model.safetensors")
    local d2 = 0
    for k, v in pairs(tw) do if ex2[k] then d2 = math.max(d2, (T.maxdiff(ex2[k], v))) end end
    T.ok(d2 == 0 and next(ex2) ~= nil, "ema.export false: the export holds the trained weights", "diff " .. d2)
    T.raises(function() run(tiny(tmp .. "/ema_bad", {["ema.decay"] = 2})) end, "ema: decay must be in [0, 1]",
        "ema.decay 2 is a config error")
    -- LoRA: the averages of the adapters, also written as an adapter (ema/adapter_model.safetensors)
    local L = tmp .. "/ema_lora"
    local lcfg = {["ema.decay"] = 0.9, ["peft.dim"] = 4, ["peft.alpha"] = 8, ["model.model_type"] = "flux",
                  ["step_scheduler.max_steps"] = 6, ["step_scheduler.ckpt_every_steps"] = 3}
    run(tiny(L, lcfg))
    local la = nemo.load_file(L .. "/epoch_0_step_5/ema/adapter_model.safetensors")
    local lm = nemo.load_file(L .. "/epoch_0_step_5/ema/model/model.safetensors")
    local ltr = nemo.load_file(L .. "/epoch_0_step_5/model/adapter_model.safetensors")
    local ln, lsame, ldiff = 0, 0, 0
    for k, v in pairs(lm) do
        local ak = "base_model.model." .. k
        ln = ln + 1
        lsame = math.max(lsame, la[ak] and (T.maxdiff(la[ak], v)) or math.huge)
        ldiff = math.max(ldiff, ltr[ak] and (T.maxdiff(ltr[ak], v)) or math.huge)
    end
    T.ok(ln > 0 and lsame == 0 and ldiff > 0 and ldiff < math.huge and
         fs.isfile(L .. "/epoch_0_step_5/ema/adapter_config.json"), string.format("ema with LoRA: the averages of " ..
         "the %d adapter tensors, also as an adapter in ema/ (nemo.peft.load_adapter reads it), differ from the " ..
         "trained adapter in model/", ln), string.format("same %g, differs %g", lsame, ldiff))
    local lt = Flux(deepcopy(TINY_TRANSFORMER))
    local lok, lerr = pcall(require("nemo.peft").load_adapter, lt, L .. "/epoch_0_step_5/ema")
    T.ok(lok, "ema with LoRA: nemo.peft.load_adapter applies ema/ to a fresh transformer", tostring(lerr))
    local LS = tmp .. "/ema_lora_stop"
    run(tiny(LS, lcfg), {stop_after = 3})
    run(tiny(LS, lcfg))
    T.ok(file_eq(LS .. "/epoch_0_step_5/ema/model/model.safetensors", L .. "/epoch_0_step_5/ema/model/model.safetensors"),
        "ema with LoRA: 3 steps, stop, resume, 3 steps == 6 steps, averages bitwise")
end

-- ==== validation: the loss of a held-out cache at fixed sigmas and noise ====
do
    local data = require "nemo.data"
    local VC = tmp .. "/val_cache"
    synthetic.make {out = VC, samples = 5, model = "flux", resolutions = "8x8,8x12", seed = 99, text_len = 4,
                    text_dim = 16, pooled_dim = 16, channels = 4, force = true}
    local vds = data.Dataset(VC)
    -- the reference: each sample alone, through the training step's own draws (use_sigma_noise
    -- false: sigma = the replayed uniform), its noise from Generator(seed * 1000003 + index)
    local function ref_val(transformer, fmc, sigmas, seed, weighted)
        local fc = deepcopy(fmc)
        fc.use_sigma_noise = false
        local fm = FM.FlowMatching(fc)
        local total = 0
        for _, sg in ipairs(sigmas) do
            local sum = 0
            for i = 1, vds:len() do
                local smp = vds:get(i)
                local batch = data.collate({smp}, {data_type = "image", pooled_dim = vds.pooled_dim})
                local noise = nemo.empty(smp.latents.shape, {dtype = "float32"})
                    :normal_(0, 1, {generator = nemo.Generator(seed * 1000003 + i)}):unsqueeze(0)
                local loss = nemo.no_grad(function()
                    return fm:step(transformer, batch, {draws = {uniform = nemo.tensor({sg}), noise = noise,
                        cfg_uniform = nemo.tensor({1})}, compute_dtype = "float32"})
                end)
                sum = sum + loss:item()
            end
            total = total + sum / vds:len()
        end
        return total / #sigmas
    end
    local function val_lines(path)
        local out = {}
        for _, m in ipairs(read_metrics(path)) do
            if m.val_loss then m.val_time = nil; out[#out + 1] = json.encode(m) end
        end
        return out
    end
    local V = tmp .. "/val"
    local vcfg = tiny(V, {["validation.cache_dir"] = VC, ["validation.every_steps"] = 4})
    local sv = run(vcfg)
    local vl = val_lines(V .. "/metrics.jsonl")
    T.ok(#vl == 4 and sv.val[-1] and sv.val[3] and sv.val[7] and sv.val[9] and
         #sv.val[9].by_sigma == 5 and vl[1]:find('"val_sigmas":[0.1,0.3,0.5,0.7,0.9]', 1, true),
        "validation: before training (step -1), every 4 steps and after the last step; 5 sigmas by default " ..
        "(midpoints of [0, 1]); in metrics.jsonl", table.concat(vl, "\n"))
    local tr0 = Flux.from_pretrained(vcfg.model.pretrained_model_name_or_path .. "/transformer")
    local r0 = ref_val(tr0, vcfg.flow_matching, {0.1, 0.3, 0.5, 0.7, 0.9}, 0)
    T.near(sv.val[-1].loss, r0, 1e-6 * r0, "validation before training == each sample alone through the step's " ..
        "own draws (rtol 1e-6)")
    local tr9 = Flux.from_pretrained(V .. "/epoch_1_step_9/diffusers/transformer")
    local r9 = ref_val(tr9, vcfg.flow_matching, {0.1, 0.3, 0.5, 0.7, 0.9}, 0)
    T.near(sv.val[9].loss, r9, 1e-6 * r9, "validation after the last step == the reference on the exported " ..
        "weights (rtol 1e-6)")
    T.ok(sv.val[9].loss < sv.val[-1].loss, "validation: the loss fell over 10 steps",
        string.format("%g -> %g", sv.val[-1].loss, sv.val[9].loss))
    local nv = run(tiny(tmp .. "/val_none"))
    local same = true
    for k = 0, 9 do same = same and nv.losses[k] == sv.losses[k] end
    T.ok(same, "validation does not change training: the 10 losses equal a run without it, bitwise")
    local sb = run(tiny(tmp .. "/val_b3", {["validation.cache_dir"] = VC, ["validation.every_steps"] = 4,
        ["validation.batch_size"] = 3}))
    T.near(sb.val[9].loss, sv.val[9].loss, 1e-6 * sv.val[9].loss, "validation.batch_size 3 == 2 (a sample's " ..
        "noise does not depend on its batch; rtol 1e-6)")
    local VS = tmp .. "/val_stop"
    run(tiny(VS, {["validation.cache_dir"] = VC, ["validation.every_steps"] = 4}), {stop_after = 5})
    run(tiny(VS, {["validation.cache_dir"] = VC, ["validation.every_steps"] = 4}))
    T.is(table.concat(val_lines(VS .. "/metrics.jsonl"), "\n"), table.concat(vl, "\n"),
        "validation: 5 steps, stop, resume, 5 steps == 10 steps (metrics' validation lines bitwise)")
    -- losses.json in every checkpoint; LOWEST_VAL names the one with the lowest validation loss and
    -- survives max_recent_checkpoints (lr 0.05: the loss rises again, so it is not the last one)
    local LV = tmp .. "/val_lowest"
    local lvo = {["validation.cache_dir"] = VC, ["validation.every_steps"] = 2, ["step_scheduler.ckpt_every_steps"] = 2,
                 ["optimizer.lr"] = 0.05, ["lr_scheduler"] = json.null}
    run(tiny(LV, lvo))
    local best, best_name, all_have = math.huge, nil, true
    for _, ck in ipairs(checkpoint.list(LV)) do
        local lj = json.read_file(ck.path .. "/losses.json")
        all_have = all_have and type(lj.train_loss) == "number" and type(lj.val_loss) == "number"
        if lj.val_loss < best then best, best_name = lj.val_loss, ck.name end
    end
    local lowest = checkpoint.read_latest(LV, "LOWEST_VAL")
    T.ok(all_have and #checkpoint.list(LV) == 5 and lowest == best_name and lowest ~= checkpoint.read_latest(LV) and
         checkpoint.resolve(LV .. "/LOWEST_VAL") == LV .. "/" .. best_name,
        "checkpoints hold losses.json (train_loss, val_loss); LOWEST_VAL names the lowest (here not the last), and " ..
        "restore_from / model.checkpoint accept it", string.format("LOWEST_VAL %s, lowest %s, LATEST %s",
        tostring(lowest), tostring(best_name), tostring(checkpoint.read_latest(LV))))
    local LK = tmp .. "/val_lowest_keep"
    local lko = deepcopy(lvo)
    lko["checkpoint.max_recent_checkpoints"] = 1
    run(tiny(LK, lko))
    local kept = {}
    for _, ck in ipairs(checkpoint.list(LK)) do kept[#kept + 1] = ck.name end
    T.is(table.concat(kept, ","), best_name .. ",epoch_1_step_9", "max_recent_checkpoints 1 keeps the LOWEST_VAL " ..
        "checkpoint besides the newest")
    local LS = tmp .. "/val_lowest_stop"
    run(tiny(LS, lvo), {stop_after = 8})
    run(tiny(LS, lvo))
    T.ok(tonumber(best_name:match("step_(%d+)$")) < 8, "LOWEST_VAL is before step 8 here (so the next check " ..
        "reads it back)", best_name)
    T.is(checkpoint.read_latest(LS, "LOWEST_VAL"), best_name, "stop after 8 steps and resume: LOWEST_VAL as in " ..
        "the uninterrupted run (the lowest so far is read back from its losses.json)")
    local sg = run(tiny(tmp .. "/val_sg", {["validation.cache_dir"] = VC, ["validation.sigmas"] = {0.25, 0.75},
        ["validation.at_start"] = false, ["validation.max_samples"] = 3, ["step_scheduler.max_steps"] = 4}))
    T.ok(sg.val[-1] == nil and sg.val[3] and #sg.val[3].by_sigma == 2,
        "validation.sigmas and at_start: false: the given sigmas, no evaluation before training")
    -- the EMA weights: val_loss_ema is the loss of the export, which holds the averages
    local E = tmp .. "/val_ema"
    local se = run(tiny(E, {["validation.cache_dir"] = VC, ["validation.ema"] = true, ["ema.decay"] = 0.9,
        ["step_scheduler.max_steps"] = 6, ["validation.every_steps"] = 3}))
    local re = ref_val(Flux.from_pretrained(E .. "/epoch_0_step_5/diffusers/transformer"), vcfg.flow_matching,
        {0.1, 0.3, 0.5, 0.7, 0.9}, 0)
    T.ok(se.val[5] and se.val[5].ema and math.abs(se.val[5].ema.loss - re) <= 1e-6 * re and
         se.val[5].ema.loss ~= se.val[5].loss, "validation.ema: the averages' loss (== the reference on the " ..
         "export, which holds them; rtol 1e-6) beside the weights'", string.format("ema %s ref %g weights %s",
         tostring(se.val[5] and se.val[5].ema and se.val[5].ema.loss), re, tostring(se.val[5] and se.val[5].loss)))
    -- holdout: validation samples set aside from the training cache
    local H = tmp .. "/val_holdout"
    local hlog = {}
    local sh = run(tiny(H, {["validation.holdout"] = 4, ["validation.every_steps"] = 4}),
        {log = function(m) hlog[#hlog + 1] = m end})
    local hcfg = tiny(H)
    local _, hcache = train.demo_paths(hcfg)
    local hheld = data.Dataset(hcache):holdout(4, 0)
    local saved_vds = vds
    vds = hheld
    local rh = ref_val(Flux.from_pretrained(H .. "/epoch_1_step_9/diffusers/transformer"), vcfg.flow_matching,
        {0.1, 0.3, 0.5, 0.7, 0.9}, 0)
    vds = saved_vds
    local htxt = table.concat(hlog, "\n")
    T.ok(sh.val[9] and math.abs(sh.val[9].loss - rh) <= 1e-6 * rh and htxt:find("validation: 4 samples of .*held out") and
         htxt:find("epochs? of 6 steps"), "validation.holdout 4: the loss of the 4 samples Dataset:holdout(4, seed 0) " ..
         "picks (rtol 1e-6), and training sees the other 12 (6 batches an epoch)", htxt:match("training [^\n]*"))
    -- bad input
    local function verr(over, pat, name)
        local c = tiny(tmp .. "/val_bad", over)
        T.raises(function() run(c) end, pat, name)
    end
    verr({["validation.every_steps"] = 4}, "validation.cache_dir is required", "validation without cache_dir")
    verr({["validation.holdout"] = 2, ["validation.cache_dir"] = VC}, "give cache_dir %(a validation cache%) or " ..
        "holdout", "validation.holdout with cache_dir")
    verr({["validation.holdout"] = 16}, "validation.holdout must be an integer in %[1, 15%]", "holding out the " ..
        "whole training cache")
    verr({["validation.cache_dir"] = tmp .. "/nope"}, "validation.cache_dir: .*does not exist",
        "validation.cache_dir that does not exist")
    verr({["validation.cache_dir"] = VC, ["validation.sigmas"] = {0.5, 1.5}}, "validation.sigmas%[2%] must be a " ..
        "number in %(0, 1%]", "a sigma above 1")
    verr({["validation.cache_dir"] = VC, ["validation.sigmas"] = {0.2}, ["flow_matching.sigma_min"] = 0.5},
        "validation.sigmas%[1%] = 0.2 is outside the sigmas this run trains, %[0.5, 1%]", "a sigma outside the " ..
        "trained window")
    verr({["validation.cache_dir"] = VC, ["validation.num_sigmas"] = 0}, "validation.num_sigmas must be a " ..
        "positive integer", "validation.num_sigmas 0")
    verr({["validation.cache_dir"] = VC, ["validation.ema"] = true}, "validation.ema: true needs an ema: block",
        "validation.ema without ema")
    verr({["validation.cache_dir"] = VC, ["validation.every"] = 3}, "unknown key 'validation.every'",
        "an unknown validation key")
    local VW = tmp .. "/val_wide"
    synthetic.make {out = VW, samples = 2, model = "flux", resolutions = "8x8", text_len = 4, text_dim = 24,
                    pooled_dim = 16, channels = 4, force = true}
    verr({["validation.cache_dir"] = VW}, "data does not fit the model: the text embeddings are 24 wide, the " ..
        "model's joint_attention_dim is 16 %(data: .*val_wide %(validation%)", "a validation cache that does not " ..
        "fit the model")
end

-- ==== loss_avg: the rolling mean of the last loss_average_window_steps losses ====
do
    local function avgs(dir)
        local out = {}
        for _, m in ipairs(read_metrics(dir .. "/metrics.jsonl")) do
            if m.loss_avg then out[m.step] = {m.loss, m.loss_avg} end
        end
        return out
    end
    local A = tmp .. "/lossavg"
    run(tiny(A, {["step_scheduler.loss_average_window_steps"] = 3}))
    local a = avgs(A)
    local ok = a[9] ~= nil
    for k = 0, 9 do
        local lo, sum = math.max(0, k - 2), 0
        for j = lo, k do sum = sum + a[j][1] end
        ok = ok and math.abs(a[k][2] - sum / (k - lo + 1)) <= 1e-15
    end
    T.ok(ok, "metrics.jsonl loss_avg: the mean of the last loss_average_window_steps (3) losses (1e-15)")
    local B = tmp .. "/lossavg_stop"
    run(tiny(B, {["step_scheduler.loss_average_window_steps"] = 3}), {stop_after = 5})
    run(tiny(B, {["step_scheduler.loss_average_window_steps"] = 3}))
    local b, same = avgs(B), true
    for k = 0, 9 do same = same and b[k] and b[k][2] == a[k][2] end
    T.ok(same, "loss_avg after stop and resume equals the uninterrupted run's (the window refilled from metrics.jsonl)")
    -- tflops: 3 x the forward's products / step_time; the forward counted on the same batch shape
    local cfgA = tiny(A)
    local model_dir, cache_dir = train.demo_paths(cfgA)
    local data = require "nemo.data"
    local batch = data.DataLoader(data.Dataset(cache_dir), {batch_size = 2, seed = 0}):iter()()
    local fm = FM.FlowMatching(cfgA.flow_matching)
    local fwd = require("nemo.flops").count(fm.step, fm, Flux.from_pretrained(model_dir .. "/transformer"), batch,
        {generator = nemo.Generator(0)})
    local worst = 0
    for _, m in ipairs(read_metrics(A .. "/metrics.jsonl")) do
        if m.tflops then worst = math.max(worst, math.abs(m.tflops * m.step_time * 1e12 / 3 - fwd) / fwd) end
    end
    T.ok(fwd > 0 and worst < 1e-9, string.format("metrics.jsonl tflops x step_time = 3 x the forward's %d " ..
        "FLOPs of a batch (rtol 1e-9)", fwd), tostring(worst))
end

-- ==== data.dataloader.dynamic_batch_size: batch sizes by resolution ====
do
    local D = tmp .. "/dynbs"
    local over = {["demo.resolutions"] = "8x8,8x12", ["data.dataloader.dynamic_batch_size"] = true,
                  ["data.dataloader.base_resolution"] = {64, 64}, ["step_scheduler.max_steps"] = 8}
    local dlog = {}
    run(tiny(D, over), {log = function(m) dlog[#dlog + 1] = m end})
    local counts = {}
    for _, m in ipairs(read_metrics(D .. "/metrics.jsonl")) do
        counts[#counts + 1] = math.floor(m.samples_per_sec * m.step_time + 0.5)
    end
    local seen = {}
    for _, c in ipairs(counts) do seen[c] = true end
    T.ok(#counts == 8 and seen[1] and seen[2] and not seen[3] and
         table.concat(dlog, "\n"):find("dynamic_batch_size: samples per micro%-batch and rank by latent size " ..
         "%(base 64x64 pixels for 2%): 2 @ 8x8, 1 @ 8x12"), "dynamic_batch_size: 2 samples a step at the base " ..
         "64x64 pixels, 1 at 64x96 (metrics' samples_per_sec x step_time)", table.concat(counts, ","))
    local DS = tmp .. "/dynbs_stop"
    run(tiny(DS, over), {stop_after = 3})
    run(tiny(DS, over))
    T.ok(file_eq(DS .. "/epoch_0_step_7/diffusers/transformer/diffusion_pytorch_model.safetensors",
        D .. "/epoch_0_step_7/diffusers/transformer/diffusion_pytorch_model.safetensors"),
        "dynamic_batch_size: 3 steps, stop, resume == 8 steps, bitwise")
end

-- ==== checkpoint.is_async: tensor files written in the background ====
do
    local function same_tree(a, b)   -- every file of checkpoint a equals b's (byte for byte), and back
        local function files(root)
            local out = {}
            local function walk(d, rel)
                for _, n in ipairs(fs.list(d)) do
                    local p, r = d .. "/" .. n, rel == "" and n or (rel .. "/" .. n)
                    if fs.isdir(p) then walk(p, r) else out[#out + 1] = r end
                end
            end
            walk(root, "")
            table.sort(out)
            return out
        end
        local fa, fb = files(a), files(b)
        if #fa ~= #fb or #fa == 0 then return false, string.format("%d vs %d files", #fa, #fb) end
        for i, r in ipairs(fa) do
            if fb[i] ~= r then return false, r .. " vs " .. tostring(fb[i]) end
            if r ~= "config.yaml" and not file_eq(a .. "/" .. r, b .. "/" .. r) then return false, r .. " differs" end
        end
        return true
    end
    local S, A = tmp .. "/async_sync", tmp .. "/async_bg"
    local ao = {["ema.decay"] = 0.9, ["checkpoint.save_consolidated"] = "every"}
    run(tiny(S, ao))
    local aa = deepcopy(ao)
    aa["checkpoint.is_async"] = true
    local alog = {}
    local sa = run(tiny(A, aa), {log = function(m) alog[#alog + 1] = m end})
    local ok4, why4 = same_tree(A .. "/epoch_0_step_4", S .. "/epoch_0_step_4")
    local ok9, why9 = same_tree(A .. "/epoch_1_step_9", S .. "/epoch_1_step_9")
    T.ok(ok4 and ok9 and checkpoint.read_latest(A) == "epoch_1_step_9" and sa.checkpoint == A .. "/epoch_1_step_9" and
         not table.concat(alog, "\n"):find("is_async", 1, true), "checkpoint.is_async: the checkpoints (weights, " ..
         "AdamW, EMA, the diffusers export) are the synchronous run's, byte for byte", tostring(why4) .. " " ..
         tostring(why9))
    local AS = tmp .. "/async_stop"
    run(tiny(AS, aa), {stop_after = 6})
    T.ok(checkpoint.read_latest(AS) == "epoch_0_step_5" and not fs.exists(AS .. "/epoch_0_step_5.incomplete"),
        "checkpoint.is_async, a run stopped after 6 steps: its last checkpoint is published before the run returns")
    run(tiny(AS, aa))
    T.ok((same_tree(AS .. "/epoch_1_step_9", S .. "/epoch_1_step_9")), "checkpoint.is_async: stop, resume == " ..
        "the uninterrupted synchronous run, byte for byte")
    -- checkpoint.save with async: unpublished until finish
    local model = Flux(deepcopy(TINY_TRANSFORMER))
    local params = {}
    for _, p in model:named_parameters() do params[#params + 1] = p end
    local opt = nemo.optim.AdamW(params, {lr = 1e-3})
    local R = tmp .. "/async_unit"
    local p = checkpoint.save(R, {epoch = 0, step = 3, model = model, optimizer = opt, async = true})
    T.ok(type(p) == "table" and fs.isdir(R .. "/epoch_0_step_3.incomplete") and checkpoint.latest(R) == nil,
        "checkpoint.save{async = true}: a pending save, not yet a checkpoint (.incomplete, no LATEST)")
    local dir = checkpoint.finish(p)
    T.ok(dir == R .. "/epoch_0_step_3" and checkpoint.latest(R) == dir and fs.isfile(dir .. "/model/model.safetensors"),
        "checkpoint.finish: the writes joined, then published (LATEST names it)")
end

-- ==== preemption: a signal ends the run after the step with a checkpoint ====
do
    local ffi = require "ffi"
    pcall(ffi.cdef, "int raise(int sig); int kill(int pid, int sig); int getpid(void);")
    local P = tmp .. "/preempt"
    local function at(step, sig)   -- the draws hook runs before each micro-batch: raise the signal there
        return {draws = function(_, info) if info.step == step then ffi.C.raise(sig) end end}
    end
    local sp = run(tiny(P), at(3, 15))
    T.ok(sp.preempted == "SIGTERM" and sp.steps == 4 and sp.checkpoint == P .. "/epoch_0_step_3" and
         fs.isdir(P .. "/epoch_0_step_3") and #read_metrics(P .. "/metrics.jsonl") == 4,
        "SIGTERM during step 3 (the default preemption_signal): the step finishes, a checkpoint is saved, the run ends",
        string.format("preempted %s, steps %s, checkpoint %s", tostring(sp.preempted), tostring(sp.steps),
            tostring(sp.checkpoint)))
    local rp = run(tiny(P))
    local full = run(tiny(tmp .. "/preempt_full"))
    T.ok(rp.resumed_from == P .. "/epoch_0_step_3" and file_eq(P .. "/epoch_1_step_9/diffusers/transformer/" ..
         "diffusion_pytorch_model.safetensors", tmp .. "/preempt_full/epoch_1_step_9/diffusers/transformer/" ..
         "diffusion_pytorch_model.safetensors"), "preempted, then resumed: the final export equals an uninterrupted " ..
         "run's, bitwise")
    -- the handler is gone once the run returns: a watched signal then has its default action again
    T.ok(require("nemo.ffi").C.nemo_signal_received(15) == 0,
        "after the run the SIGTERM record is cleared (the handler is unwatched)")
    local su = run(tiny(tmp .. "/preempt_usr1", {["step_scheduler.preemption_signal"] = {"SIGUSR1", "SIGUSR2"}}),
        at(2, 12))
    T.ok(su.preempted == "SIGUSR2" and su.checkpoint == tmp .. "/preempt_usr1/epoch_0_step_2",
        "step_scheduler.preemption_signal [SIGUSR1, SIGUSR2]: SIGUSR2 ends the run after step 2")
    T.raises(function() run(tiny(tmp .. "/preempt_bad", {["step_scheduler.preemption_signal"] = "SIGFOO"})) end,
        "step_scheduler.preemption_signal: SIGFOO is not a signal", "an unknown preemption_signal is an error")
    local ps = train.preemption_signals
    T.ok(#ps(nil) == 1 and ps(nil)[1] == 15 and #ps(false) == 0 and #ps("none") == 0 and ps("TERM")[1] == 15 and
         ps(10)[1] == 10 and #ps({"SIGUSR1", "sigusr2"}) == 2, "preemption_signal: SIGTERM when unset; false or " ..
         "'none' watch nothing; names with or without SIG, any case; numbers; lists")
end

-- ==== validation samples: images / videos of the model being trained ====
do
    local golden = require "golden"
    local data = require "nemo.data"
    local sampling = require "nemo.sampling"
    local image = require "nemo.image"
    local FP = golden.tiny_flux_pipeline(tmp .. "/sp_flux")          -- transformer, VAE, scheduler, CLIP + T5
    local FC, FV = tmp .. "/sp_fcache", tmp .. "/sp_fval"
    synthetic.make {out = FC, samples = 8, model = "flux", resolutions = "8x8", seed = 1, text_len = 4, text_dim = 32,
                    pooled_dim = 32, channels = 4, force = true}
    synthetic.make {out = FV, samples = 3, model = "flux", resolutions = "8x8", seed = 99, text_len = 4, text_dim = 32,
                    pooled_dim = 32, channels = 4, force = true}
    local function scfg(dir, over)
        local c = {
            seed = 7,
            model = {pretrained_model_name_or_path = FP, mode = "finetune", torch_dtype = "float32",
                     compute_dtype = "float32"},
            optimizer = {_target_ = "torch.optim.AdamW", lr = 1e-3},
            flow_matching = {adapter_type = "flux"},
            step_scheduler = {num_epochs = 10, local_batch_size = 2, global_batch_size = 2, max_steps = 4,
                              ckpt_every_steps = 100},
            data = {dataloader = {_target_ = "nemo.data.build_dataloader", cache_dir = FC}},
            checkpoint = {enabled = true, checkpoint_dir = dir, save_consolidated = "final"},
            validation = {cache_dir = FV, every_steps = 2, sampling = {num_samples = 2, num_inference_steps = 3}},
        }
        return with_overrides(c, over)
    end
    local full = nemo.NeMoAutoDiffusionPipeline.from_pretrained(FP, {torch_dtype = "float32", device = "cpu"})
    local fc = full.components
    local vds = data.Dataset(FV)
    -- sample i of the cache through nemo.sampling.flux with `transformer`, written as the recipe would
    local function ref_png(transformer, i, path, o)
        o = o or {}
        local smp = vds:get(i + 1)
        local r = sampling.flux{transformer = transformer, scheduler = fc.scheduler, vae = fc.vae,
            prompt_embeds = o.pe or smp.text_embeddings:float():unsqueeze(0),
            pooled_prompt_embeds = o.pooled or smp.pooled:float():unsqueeze(0), height = 16, width = 16,
            num_inference_steps = 3, generator = nemo.Generator(i)}
        image.save(path, (sampling.to_uint8(r.image)))
        return path
    end
    local S = tmp .. "/sp_run"
    local ss = run(scfg(S))
    local f0 = ss.samples[-1] and ss.samples[-1][1]
    T.ok(ss.samples[-1] and #ss.samples[-1] == 2 and ss.samples[1] and ss.samples[3] and
         f0 == S .. "/samples/before_training/sample_000_" .. vds:get(1).caption:gsub(" ", "_") .. ".png" and
         fs.isfile(S .. "/samples/step_3/sample_001_" .. vds:get(2).caption:gsub(" ", "_") .. ".png"),
        "validation.sampling: 2 images before training and after steps 1 and 3, in <checkpoint_dir>/samples/<when>/, " ..
        "named by caption", tostring(f0))
    T.ok(file_eq(f0, ref_png(fc.transformer, 0, tmp .. "/sp_ref0.png")) and
         file_eq(ss.samples[-1][2], ref_png(fc.transformer, 1, tmp .. "/sp_ref1.png")),
        "validation.sampling before training: the PNGs are nemo.sampling.flux's of the cached embeddings, bytewise")
    local exp = Flux.from_pretrained(S .. "/epoch_0_step_3/diffusers/transformer")
    T.ok(file_eq(ss.samples[3][1], ref_png(exp, 0, tmp .. "/sp_ref3.png")) and
         not file_eq(ss.samples[3][1], f0), "validation.sampling after the last step: the exported weights' image, " ..
         "bytewise (and not the untrained one)")
    local plain = run(scfg(tmp .. "/sp_plain", {validation = json.null}))
    local same = true
    for k = 0, 3 do same = same and plain.losses[k] == ss.losses[k] end
    T.ok(same, "validation.sampling does not change training: the losses equal a run without it, bitwise")
    -- prompts, encoded once with the pipeline's CLIP and T5
    local PR = {"a photo of a cat", "a red ring on grass"}
    local sp = run(scfg(tmp .. "/sp_prompts", {["validation.cache_dir"] = json.null, ["validation.sampling"] =
        {prompts = PR, num_inference_steps = 3, height = 16, width = 16}, ["step_scheduler.max_steps"] = 2}))
    local enc = sampling.flux_encode_prompt{prompt = {PR[2]}, tokenizer = fc.tokenizer,
        text_encoder = fc.text_encoder, tokenizer_2 = fc.tokenizer_2, text_encoder_2 = fc.text_encoder_2}
    local pe, pooled = enc.prompt_embeds, enc.pooled_prompt_embeds
    T.ok(sp.samples[1] and #sp.samples[1] == 2 and sp.val[1] == nil and sp.samples[-1][2]:find("sample_001_a_red_ring_on_grass.png", 1, true) and
         file_eq(sp.samples[-1][2], ref_png(fc.transformer, 1, tmp .. "/sp_refp.png", {pe = pe, pooled = pooled})),
        "validation.sampling.prompts without a cache: the prompts encoded by the pipeline's CLIP and T5, no loss; " ..
        "the images are nemo.sampling.flux's, bytewise")
    -- Wan: a video per cached sample, with classifier-free guidance against the encoded negative prompt
    local WP = golden.tiny_wan_pipeline(tmp .. "/sp_wan")
    local WC = tmp .. "/sp_wcache"
    synthetic.make {out = WC, samples = 4, model = "wan", resolutions = "4x4", frames = 2, seed = 3, text_len = 4,
                    text_dim = 32, channels = 4, force = true}
    local sw = run(scfg(tmp .. "/sp_wrun", {["model.pretrained_model_name_or_path"] = WP, ["flow_matching.adapter_type"] =
        "simple", ["data.dataloader.cache_dir"] = WC, ["validation.cache_dir"] = WC, ["validation.sampling"] =
        {num_samples = 1, num_inference_steps = 2, guidance_scale = 3, negative_prompt = "blurry"},
        ["step_scheduler.max_steps"] = 2, ["validation.at_start"] = false}))
    local wpipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(WP, {torch_dtype = "float32", device = "cpu"})
    local wc = wpipe.components
    local wexp = require("nemo.models.wan").WanTransformer3DModel.from_pretrained(tmp ..
        "/sp_wrun/epoch_0_step_1/diffusers/transformer")
    local wds = data.Dataset(WC)
    local npe = sampling.wan_encode_prompt{prompt = {"blurry"}, tokenizer = wc.tokenizer, text_encoder = wc.text_encoder}
    local lat = wds:get(1).latents.shape
    local vsf = wc.vae.config.scale_factor_spatial or 8
    local rv = sampling.wan{transformer = wexp, scheduler = wc.scheduler, vae = wc.vae,
        prompt_embeds = wds:get(1).text_embeddings:float():unsqueeze(0), negative_prompt_embeds = npe,
        height = lat[3] * vsf, width = lat[4] * vsf, num_frames = (lat[2] - 1) * 4 + 1, num_inference_steps = 2,
        guidance_scale = 3, generator = nemo.Generator(0)}
    image.save_video(tmp .. "/sp_wref.mp4", sampling.video_frames(rv.video, 1), {fps = 16})
    T.ok(sw.samples[1] and #sw.samples[1] == 1 and sw.samples[1][1]:match("%.mp4$") and
         file_eq(sw.samples[1][1], tmp .. "/sp_wref.mp4"), "validation.sampling on Wan: an MP4 per sample, " ..
         "nemo.sampling.wan's (guidance 3 against the encoded negative prompt) on the exported weights, bytewise",
         tostring(sw.samples[1] and sw.samples[1][1]))
    -- the demo pipelines carry a small VAE and the scheduler, so samples work on the demo too
    local dcfg = tiny(tmp .. "/sp_demo", {["step_scheduler.max_steps"] = 3, ["validation.sampling"] =
        {num_samples = 1, num_inference_steps = 2}})
    local dmodel, dcache = train.demo_paths(dcfg)
    dcfg.validation.cache_dir = dcache
    local dsum = run(dcfg)
    local didx = json.read_file(dmodel .. "/model_index.json")
    T.ok(dsum.samples[2] and #dsum.samples[2] == 1 and fs.isfile(dsum.samples[2][1]) and didx.vae[2] == "AutoencoderKL" and
         didx.scheduler[2] == "FlowMatchEulerDiscreteScheduler", "the FLUX demo pipeline has a VAE and the scheduler: " ..
         "validation samples work on the demo")
    -- a demo made before (no VAE) gets them on its next run
    fs.remove_tree(dmodel .. "/vae")
    didx.vae, didx.scheduler = nil, nil
    json.write_file(dmodel .. "/model_index.json", didx)
    local dlog = {}
    run(tiny(tmp .. "/sp_demo2", {["step_scheduler.max_steps"] = 3}), {log = function(m) dlog[#dlog + 1] = m end})
    T.ok(fs.isdir(dmodel .. "/vae") and json.read_file(dmodel .. "/model_index.json").vae ~= nil and
         table.concat(dlog, "\n"):find("demo: adding a small VAE and the scheduler", 1, true),
        "an older demo pipeline without a VAE gets one (and the scheduler) on the next run")
    -- bad input
    local function serr(over, pat, name) T.raises(function() run(scfg(tmp .. "/sp_bad", over)) end, pat, name) end
    serr({["validation.sampling"] = {num_samples = 1, prompts = {"a"}}}, "validation.sampling: give prompts or " ..
        "num_samples, not both", "validation.sampling: prompts and num_samples together")
    serr({["validation.sampling"] = {num_inference_steps = 2}}, "validation.sampling: give num_samples",
        "validation.sampling without prompts or num_samples")
    serr({["validation.cache_dir"] = json.null, ["validation.sampling"] = {num_samples = 2}},
        "validation.cache_dir is required", "validation.sampling.num_samples without a validation cache")
    serr({["validation.sampling"] = {num_samples = 1, stepz = 2}}, "unknown key 'validation.sampling.stepz'",
        "an unknown validation.sampling key")
    serr({["validation.sampling"] = {prompts = {"a", 3}}}, "validation.sampling: prompts%[2%] must be a string",
        "a prompt that is not a string")
    local NV = tmp .. "/sp_novae"
    fs.mkdirs(NV)
    fs.copy_tree(FP .. "/transformer", NV .. "/transformer")
    json.write_file(NV .. "/model_index.json", {_class_name = "FluxPipeline", transformer = {"diffusers",
        "FluxTransformer2DModel"}})
    serr({["model.pretrained_model_name_or_path"] = NV}, "validation.sampling: the pipeline .*sp_novae cannot give " ..
        "the vae, scheduler samples need", "validation.sampling with a pipeline without a VAE")
end

-- ==== tools/export_checkpoint.lua: a checkpoint as a diffusers folder ====
do
    local function sd_diff(a, b)   -- the largest difference between two state dicts (inf when keys differ)
        local worst, n = 0, 0
        for k, v in pairs(a) do
            n = n + 1
            worst = b[k] and math.max(worst, (T.maxdiff(v, b[k]))) or math.huge
        end
        for k in pairs(b) do if not a[k] then worst = math.huge end end
        return worst, n
    end
    local function exported(dir) return nemo.load_file(dir .. "/transformer/diffusion_pytorch_model.safetensors") end
    -- LOWEST_VAL of the validation run: the checkpoint's weights, with the source pipeline's parts
    local X1 = tmp .. "/export_lowest"
    local out, rc = sh(env .. "./nemo-lua tools/export_checkpoint.lua --checkpoint " .. tmp .. "/val_lowest/LOWEST_VAL" ..
        " --out " .. X1)
    local lowest = checkpoint.read_latest(tmp .. "/val_lowest", "LOWEST_VAL")
    local d1, n1 = sd_diff(exported(X1), nemo.load_file(tmp .. "/val_lowest/" .. lowest .. "/model/model.safetensors"))
    T.ok(rc == 0 and d1 == 0 and n1 > 0 and fs.isfile(X1 .. "/model_index.json") and
         Flux.from_pretrained(X1 .. "/transformer") ~= nil, string.format("export_checkpoint of LOWEST_VAL (%s): " ..
         "the checkpoint's %d tensors exactly, in a diffusers folder that loads", tostring(lowest), n1), out)
    -- --ema: the averages, as the recipe's final export (which holds them) writes them
    local X2 = tmp .. "/export_ema"
    out, rc = sh(env .. "./nemo-lua tools/export_checkpoint.lua --ema --checkpoint " .. tmp .. "/ema --out " .. X2)
    T.ok(rc == 0 and file_eq(X2 .. "/transformer/diffusion_pytorch_model.safetensors", tmp ..
        "/ema/epoch_0_step_5/diffusers/transformer/diffusion_pytorch_model.safetensors"), "export_checkpoint --ema " ..
        "of a checkpoint_dir (its newest): the recipe's own export of the averages, byte for byte", out)
    -- a LoRA checkpoint: the adapter merged into the source weights
    local X3 = tmp .. "/export_lora"
    out, rc = sh(env .. "./nemo-lua tools/export_checkpoint.lua --checkpoint " .. tmp .. "/ema_lora/epoch_0_step_5" ..
        " --out " .. X3)
    local peft = require "nemo.peft"
    local demo_model = train.demo_paths(tiny(tmp .. "/unused_x"))   -- the LoRA run's source pipeline
    local ref = Flux.from_pretrained(demo_model .. "/transformer")
    peft.load_adapter(ref, tmp .. "/ema_lora/epoch_0_step_5/model")
    peft.merge(ref)
    local d3, n3 = sd_diff(exported(X3), ref:state_dict())
    T.ok(rc == 0 and d3 == 0 and n3 > 0 and out:find("merged the LoRA adapter", 1, true), "export_checkpoint of a " ..
        "LoRA checkpoint: the source weights with the adapter merged (peft.merge), exactly", out)
    out, rc = sh(env .. "./nemo-lua tools/export_checkpoint.lua --checkpoint " .. tmp .. "/val_lowest --out " .. X1)
    T.ok(rc ~= 0 and out:find(X1 .. " exists", 1, true) and fs.isfile(X1 .. "/model_index.json") and
         sd_diff(exported(X1), nemo.load_file(tmp .. "/val_lowest/" .. lowest .. "/model/model.safetensors")) == 0,
        "export_checkpoint into an existing folder: an error, the folder untouched", out)
    out, rc = sh(env .. "./nemo-lua tools/export_checkpoint.lua --ema --checkpoint " .. tmp .. "/val_lowest --out " ..
        tmp .. "/export_noema")
    T.ok(rc ~= 0 and out:find("has no EMA weights", 1, true) and not fs.exists(tmp .. "/export_noema"),
        "export_checkpoint --ema of a run without ema: an error, nothing written", out)
end

-- ==== flux_pretrain with a tiny transformer config folder ====

local tf = tmp .. "/tiny_flux"
fs.mkdirs(tf .. "/transformer")
local tfc = deepcopy(TINY_TRANSFORMER)
tfc._class_name = "FluxTransformer2DModel"
json.write_file(tf .. "/transformer/config.json", tfc)
local pout, prc = sh(env .. "./nemo-lua recipes/flux_pretrain.lua --model.pretrained_model_name_or_path " .. tf ..
    " --data.dataloader.cache_dir " .. cache_dir .. " --step_scheduler.max_steps 4 --step_scheduler.global_batch_size 4" ..
    " --step_scheduler.local_batch_size 2 --checkpoint.checkpoint_dir " .. tmp .. "/pre")
local mpre = read_metrics(tmp .. "/pre/metrics.jsonl")
T.ok(prc == 0 and #mpre == 4, "flux_pretrain with a tiny config folder: 4 steps (2 micro-batches each)", pout)
T.ok(pout:find("(pretrain,", 1, true) and fs.isfile(tmp .. "/pre/epoch_0_step_3/diffusers/transformer/config.json"),
    "flux_pretrain: built by from_config, final checkpoint with the diffusers export")
local ptr = Flux.from_pretrained(tmp .. "/pre/epoch_0_step_3/diffusers/transformer")
T.is(ptr.config.num_layers, 1, "flux_pretrain: the export loads with FluxTransformer2DModel.from_pretrained")

fs.remove_tree(tmp)
T.done()
