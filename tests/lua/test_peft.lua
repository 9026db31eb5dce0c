-- tests/lua/test_peft.lua: LoRA (lua/nemo/peft.lua) and the recipe's peft block: Automodel's
-- PeftConfig and ModuleMatcher rules, LoRALinear's forward and gradients (float64 exact and
-- against central differences), an adapted FLUX model starting equal to its base with every
-- adapter reaching the output, freezing, save_adapter / load_adapter (Automodel's files and
-- keys), merge, and LoRA training runs: only the adapters change, checkpoints hold the adapters
-- only, resume equals an uninterrupted run bit for bit, bad blocks are clear errors.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local fs = require "nemo.fs"
local json = require "nemo.json"
local train = require "nemo.train"
local peft = require "nemo.peft"
local gradcheck = require "gradcheck"
local F = nemo.F

local tmp = os.tmpname()
os.remove(tmp)
fs.mkdirs(tmp)
local function rnd(shape, seed, dtype)
    return nemo.randn(shape, {generator = nemo.Generator(seed), dtype = dtype or "float64"})
end

-- ==== PeftConfig ====
local c0 = peft.PeftConfig{}
T.ok(c0.dim == 8 and c0.alpha == 32 and c0.dropout == 0 and c0.dropout_position == "post" and
     c0.lora_A_init == "xavier" and c0.lora_dtype == nil and not c0.use_dora,
     "PeftConfig defaults are Automodel's: dim 8, alpha 32, dropout 0 post, xavier, lora_dtype unset")
T.ok(peft.PeftConfig{_target_ = "nemo_automodel.components._peft.lora.PeftConfig", dim = 4} ~= nil,
     "the YAML block's _target_ is accepted")
T.is(peft.PeftConfig{lora_dtype = "torch.bfloat16"}.lora_dtype, "bfloat16", "lora_dtype 'torch.bfloat16' is bfloat16")
T.raises(function() peft.PeftConfig{dimm = 4} end, "unknown key dimm", "an unknown key is an error naming it")
T.raises(function() peft.PeftConfig{dim = 0} end, "peft.dim: expected a positive integer", "dim 0 is an error")
T.raises(function() peft.PeftConfig{use_dora = true} end, "DoRA is not available", "use_dora is a clear error")
T.raises(function() peft.PeftConfig{dropout = 1} end, "peft.dropout: expected a probability", "dropout 1 is an error")
T.raises(function() peft.PeftConfig{dropout_position = "mid"} end, "'pre' or 'post'", "a bad dropout_position")
T.raises(function() peft.PeftConfig{lora_A_init = "zeros"} end, "'xavier' or 'uniform'", "a bad lora_A_init")
T.raises(function() peft.PeftConfig{lora_dtype = "int8"} end, "peft.lora_dtype", "an integer lora_dtype")
T.raises(function() peft.PeftConfig{target_modules = {"a"}, exclude_modules = {"b"}} end, "mutually exclusive",
         "target_modules with exclude_modules is an error (Automodel's ValueError)")
T.raises(function() peft.PeftConfig{match_all_linear = true, target_modules = {"a"}} end, "must be empty",
         "match_all_linear with target_modules is an error")
T.raises(function() peft.PeftConfig{target_modules = {"(to_q|to_k)"}} end, "do not support",
         "regex alternation in a pattern is a clear error")

-- ==== ModuleMatcher (Automodel's wildcard_match examples and rules) ====
local m1 = peft.ModuleMatcher{target_modules = {"*.layers.0.*.linear_qkv"}}
T.ok(m1:match("decoder.layers.0.self_attention.linear_qkv", true), "'*.layers.0.*.linear_qkv' matches layer 0")
T.ok(not m1:match("decoder.layers.1.self_attention.linear_qkv", true), "... and not layer 1")
local m2 = peft.ModuleMatcher{target_modules = {"*.attn.to_out.0", "proj_out"}}
T.ok(m2:match("transformer_blocks.3.attn.to_out.0", true), "'*.attn.to_out.0' matches a block's to_out.0")
T.ok(not m2:match("transformer_blocks.3.attn.to_out.01", true), "patterns are anchored at the end")
T.ok(m2:match("proj_out", true) and not m2:match("x.proj_out", true), "a plain name matches itself only")
T.ok(m2:match("ab.attnXto_out.0", true), "'.' is any character, as in Python's re")
local m3 = peft.ModuleMatcher{exclude_modules = {"*.ff.*"}}
T.ok(m3:match("blocks.0.attn.to_q", true) and not m3:match("blocks.0.ff.net.2", true),
     "exclude_modules: every Linear but the excluded ones")
T.ok(not m3:match("blocks.0.norm", false), "exclude_modules never matches a module that is not a Linear")
local m4 = peft.ModuleMatcher{}
T.ok(m4.defaulted and m4:match("a.q_proj", true) and not m4:match("a.to_q", true),
     "no targets: the default target is '*_proj'")
T.ok(peft.ModuleMatcher{match_all_linear = true}:match("anything", true), "match_all_linear matches every Linear")

-- ==== LoRALinear ====
do
    local lin = nemo.nn.Linear(6, 5, {dtype = "float64", generator = nemo.Generator(1)})
    local l = peft.LoRALinear(lin, {dim = 3, alpha = 6, lora_dtype = "float64", generator = nemo.Generator(2)})
    T.ok(rawequal(l.weight, lin.weight) and rawequal(l.bias, lin.bias), "LoRALinear keeps the Linear's weight and bias")
    T.ok(not l.weight.requires_grad and not l.bias.requires_grad and l.lora_A.weight.requires_grad and
         l.lora_B.weight.requires_grad, "the base weight and bias are frozen, the adapters trainable")
    T.ok(table.concat(l.lora_A.weight.shape, ",") == "3,6" and table.concat(l.lora_B.weight.shape, ",") == "5,3",
         "lora_A is (dim, in), lora_B (out, dim)")
    T.is(l.lora_B.weight:abs():sum():item(), 0, "lora_B starts at zero")
    local x = rnd({2, 4, 6}, 3)
    T.ok(T.same_bits(l(x), lin(x)), "at initialisation the adapted layer equals the Linear bit for bit")
    local sd = l:state_dict()
    T.ok(sd["lora_A.weight"] and sd["lora_B.weight"] and sd.weight and sd.bias, "state_dict: weight, bias, lora_A.weight, lora_B.weight")
    nemo.no_grad(function() l.lora_B.weight:copy_(rnd({5, 3}, 4)) end)
    local want = F.linear(x, lin.weight, lin.bias) + F.linear(F.linear(x, l.lora_A.weight) * 2, l.lora_B.weight)
    T.ok(T.same_bits(l(x), want), "forward = linear(x, W, b) + linear(linear(x, A) * alpha/dim, B), float64 bit for bit")
    local A, B = l.lora_A.weight:detach():clone():requires_grad_(), l.lora_B.weight:detach():clone():requires_grad_()
    local xg = x:clone():requires_grad_()
    gradcheck(T, "LoRALinear", function(xx, a, b)
        local ll = peft.LoRALinear(lin, {dim = 3, alpha = 6, lora_dtype = "float64"})
        ll.lora_A:register_parameter("weight", a)
        ll.lora_B:register_parameter("weight", b)
        return ll(xx)
    end, {xg, A, B}, {eps = 1e-6, rtol = 1e-6, atol = 1e-9})
    -- dropout: on the adapter's output (post) or input (pre) in training only
    local ld = peft.LoRALinear(lin, {dim = 3, alpha = 6, lora_dtype = "float64", dropout = 0.5})
    nemo.no_grad(function() ld.lora_B.weight:copy_(rnd({5, 3}, 4)) end)
    ld:eval()
    T.ok(T.same_bits(ld(x), F.linear(x, lin.weight, lin.bias) +
        F.linear(F.linear(x, ld.lora_A.weight) * 2, ld.lora_B.weight)), "dropout is off in eval mode")
    ld:train()
    local y1, y2 = ld(x), ld(x)
    T.ok(not T.same_bits(y1, y2), "in training dropout draws a new mask each call")
    -- a bf16 adapter on a float32 layer: the adapter's products in bf16, the result float32
    local lin32 = nemo.nn.Linear(6, 5, {generator = nemo.Generator(1)})
    local lb = peft.LoRALinear(lin32, {dim = 3, alpha = 6, lora_dtype = "bfloat16"})
    T.is(lb.lora_A.weight.dtype, "bfloat16", "lora_dtype bfloat16: the adapters are bfloat16")
    local yb = lb(x:float())
    T.is(yb.dtype, "float32", "... and a float32 input gives a float32 output")
end

-- ==== an adapted FLUX model ====
local FCFG = {num_layers = 1, num_single_layers = 1, attention_head_dim = 8, num_attention_heads = 2, in_channels = 8,
              joint_attention_dim = 16, pooled_projection_dim = 16, axes_dims_rope = {2, 2, 4}, guidance_embeds = true}
local FLUX_TARGETS = {"*.attn.to_q", "*.attn.to_k", "*.attn.to_v", "*.attn.to_out.0", "*.attn.add_q_proj",
                      "*.attn.add_k_proj", "*.attn.add_v_proj", "*.attn.to_add_out", "*.ff.net.0.proj", "*.ff.net.2",
                      "*.ff_context.net.0.proj", "*.ff_context.net.2"}
local function flux_model()
    nemo.manual_seed(11)
    return nemo.FluxTransformer2DModel(FCFG):double()
end
local inputs = {hidden_states = rnd({1, 16, 8}, 20), encoder_hidden_states = rnd({1, 4, 16}, 21),
                pooled_projections = rnd({1, 16}, 22), timestep = nemo.tensor({0.5}, {dtype = "float64"}),
                guidance = nemo.tensor({3.5}, {dtype = "float64"}),
                img_ids = nemo.zeros({16, 3}, {dtype = "float64"}), txt_ids = nemo.zeros({4, 3}, {dtype = "float64"})}
local base = flux_model()
local ref = base(inputs)
local model = flux_model()
local cfg = peft.PeftConfig{dim = 4, alpha = 8, lora_dtype = "float64", target_modules = FLUX_TARGETS}
local n = peft.apply_lora(model, cfg, {generator = nemo.Generator(5)})
T.is(n, 15, "Automodel's FLUX targets adapt 12 Linear layers of a double block and 3 of a single block")
T.ok(T.same_bits(model(inputs), ref), "the adapted model starts equal to its base, bit for bit")
local frozen = peft.freeze_base(model)
local lp = peft.lora_parameters(model)
T.is(#lp, 30, "30 trainable adapter matrices")
local trainable = 0
for _, p in model:named_parameters() do if p.requires_grad then trainable = trainable + 1 end end
T.ok(frozen > 0 and trainable == 30, "freeze_base leaves only the adapters trainable")
do   -- every adapter reaches the output: a nonzero B in any one of them changes it
    local dead = {}
    for _, name in ipairs(peft.adapted_modules(model)) do
        local B = model:get_submodule(name).lora_B.weight
        nemo.no_grad(function() B:fill_(0.01) end)
        if T.same_bits(model(inputs), ref) then dead[#dead + 1] = name end
        nemo.no_grad(function() B:zero_() end)
    end
    T.ok(#dead == 0, "each of the 15 adapters changes the model's output when its B is nonzero",
         "no effect: " .. table.concat(dead, ", "))
end
do   -- gradients reach the adapters only
    for _, e in ipairs(lp) do if e[1]:find("lora_B") then nemo.no_grad(function() e[2]:copy_(rnd(e[2].shape, 30) * 0.1) end) end end
    local out = model(inputs)
    local l2 = (out * out):sum()
    l2:backward()
    local ok = true
    for name, p in model:named_parameters() do
        local is_lora = name:find("lora_", 1, true) ~= nil
        if is_lora ~= (p.grad ~= nil) then ok = false end
    end
    T.ok(ok, "backward: every adapter gets a gradient and no frozen weight does")
end

-- Automodel's Wan targets (*.to_q, *.to_v): self- and cross-attention of every block, each reaching the output
do
    nemo.manual_seed(12)
    local wcfg = {patch_size = {1, 2, 2}, num_attention_heads = 2, attention_head_dim = 8, in_channels = 4,
                  out_channels = 4, text_dim = 6, freq_dim = 32, ffn_dim = 24, num_layers = 2, rope_max_seq_len = 16}
    local wan = nemo.WanTransformer3DModel(wcfg):double()
    local wi = {hidden_states = rnd({1, 4, 2, 4, 4}, 50), timestep = nemo.tensor({500}, {dtype = "float64"}),
                encoder_hidden_states = rnd({1, 3, 6}, 51)}
    local wref = wan(wi)
    local nw = peft.apply_lora(wan, {dim = 2, alpha = 2, lora_dtype = "float64", target_modules = {"*.to_q", "*.to_v"}})
    T.is(nw, 8, "Wan: '*.to_q' and '*.to_v' adapt attn1 and attn2 of both blocks (8 layers)")
    local dead = {}
    for _, name in ipairs(peft.adapted_modules(wan)) do
        local B = wan:get_submodule(name).lora_B.weight
        nemo.no_grad(function() B:fill_(0.05) end)
        if T.same_bits(wan(wi), wref) then dead[#dead + 1] = name end
        nemo.no_grad(function() B:zero_() end)
    end
    T.ok(#dead == 0, "Wan: each adapter changes the output when its B is nonzero", table.concat(dead, ", "))
end

-- ==== save_adapter / load_adapter / merge ====
local adir = tmp .. "/adapter"
peft.save_adapter(model, adir, cfg, {base = "some/model"})
local ac = json.read_file(adir .. "/adapter_config.json")
T.ok(ac.peft_type == "LORA" and ac.r == 4 and ac.lora_alpha == 8 and ac.bias == "none" and ac.use_dora == false and
     #ac.target_modules == 15 and ac.base_model_name_or_path == "some/model",
     "adapter_config.json: peft_type LORA, r, lora_alpha, bias none, the 15 adapted modules' full names")
local meta = json.read_file(adir .. "/automodel_peft_config.json")
T.ok(meta.dim == nil and meta.lora_A_init == "xavier" and meta.lora_dtype == "torch.float64" and #meta.target_modules == 12,
     "automodel_peft_config.json: the other PeftConfig fields (dim and alpha live in adapter_config.json)")
local w = require("nemo.safetensors").load_file(adir .. "/adapter_model.safetensors")
local keys = {}
for k in pairs(w) do keys[#keys + 1] = k end
table.sort(keys)
T.ok(#keys == 30 and keys[1] == "base_model.model.single_transformer_blocks.0.attn.to_k.lora_A.weight",
     "adapter_model.safetensors: the 30 adapter tensors as base_model.model.<fqn>.lora_{A,B}.weight", keys[1])
local adapted_out = model(inputs)
local fresh = flux_model()
peft.load_adapter(fresh, adir)
T.ok(T.same_bits(fresh(inputs), adapted_out), "load_adapter on a fresh base model reproduces the adapted output")
local half = flux_model()
peft.load_adapter(half, adir, {scale = 0})
T.ok(T.same_bits(half(inputs), ref), "load_adapter with scale 0 gives the base model back")
T.raises(function() peft.load_adapter(flux_model(), tmp .. "/nowhere") end, "no adapter_config.json",
         "load_adapter of a folder without an adapter is an error")
do
    local bad = tmp .. "/adapter_bad"
    fs.mkdirs(bad)
    local ac2 = json.read_file(adir .. "/adapter_config.json")
    ac2.target_modules[1] = "transformer_blocks.0.attn.to_zz"
    json.write_file(bad .. "/adapter_config.json", ac2)
    T.raises(function() peft.load_adapter(flux_model(), bad) end, "does not have",
             "an adapter naming a module the model lacks is an error")
    local w2 = {}
    for k, v in pairs(w) do if not k:find("to_q.lora_A", 1, true) then w2[k] = v end end
    local bad2 = tmp .. "/adapter_missing"
    fs.mkdirs(bad2)
    fs.copy_file(adir .. "/adapter_config.json", bad2 .. "/adapter_config.json")
    require("nemo.safetensors").save_file(w2, bad2 .. "/adapter_model.safetensors", {format = "pt"})
    T.raises(function() peft.load_adapter(flux_model(), bad2) end, "missing", "a missing adapter tensor is an error")
end
local merged = flux_model()
peft.load_adapter(merged, adir)
T.is(peft.merge(merged), 15, "merge folds the 15 adapters")
T.close(merged(inputs), adapted_out, 1e-12, 0, "the merged model computes the adapted model's output (float64, rtol 1e-12)")
local msd = merged:state_dict()
local lora_left = false
for k in pairs(msd) do if k:find("lora_", 1, true) then lora_left = true end end
T.ok(not lora_left and #peft.adapted_modules(merged) == 0, "after merge no adapter is left: a plain diffusers model")

-- ==== the recipe's peft block ====
local TINY = {num_layers = 1, num_single_layers = 1, attention_head_dim = 8, num_attention_heads = 2, in_channels = 16,
              joint_attention_dim = 16, pooled_projection_dim = 16, axes_dims_rope = {2, 2, 4}, guidance_embeds = true}
local function tiny(dir, over)
    local c = {
        seed = 7,
        demo = {enabled = true, dir = tmp .. "/demo", samples = 16, resolutions = "8x8", text_len = 4, transformer = TINY},
        model = {pretrained_model_name_or_path = "unused", mode = "finetune", model_type = "flux", torch_dtype = "float32",
                 compute_dtype = "float32"},
        peft = {dim = 4, alpha = 8, target_modules = FLUX_TARGETS},
        optimizer = {_target_ = "torch.optim.AdamW", lr = 1e-2, weight_decay = 0.01, betas = {0.9, 0.999}},
        flow_matching = {adapter_type = "flux", adapter_kwargs = {guidance_scale = 1}, timestep_sampling = "logit_normal",
                         flow_shift = 1.0, mix_uniform_ratio = 0.0, use_loss_weighting = false},
        step_scheduler = {num_epochs = 100, local_batch_size = 2, global_batch_size = 2, max_steps = 10,
                          ckpt_every_steps = 5, save_checkpoint_every_epoch = false},
        data = {dataloader = {_target_ = "nemo.data.build_dataloader", cache_dir = "unused"}},
        checkpoint = {enabled = true, checkpoint_dir = dir, save_consolidated = "final"},
    }
    for k, v in pairs(over or {}) do
        local node, parts = c, {}
        for p in k:gmatch("[^%.]+") do parts[#parts + 1] = p end
        for i = 1, #parts - 1 do node = node[parts[i]] end
        if v == json.null then v = nil end
        node[parts[#parts]] = v
    end
    return c
end
local logs = {}
local function run(c, o)
    o = o or {}
    o.log = function(msg) logs[#logs + 1] = msg end
    o.progress = false
    return train.run(c, o)
end
local A = tmp .. "/runA"
local sA = run(tiny(A))
local joined = table.concat(logs, "\n")
T.ok(joined:find("LoRA: 15 Linear layers adapted (dim 4, alpha 8, float32)", 1, true),
     "the run says how many layers it adapted", joined:match("LoRA[^\n]*"))
local final = sA.checkpoint
T.ok(fs.isfile(final .. "/model/adapter_model.safetensors") and not fs.exists(final .. "/model/model.safetensors") and
     not fs.exists(final .. "/diffusers"),
     "a LoRA checkpoint holds the adapter (no full model, no diffusers export)")
-- only the adapters moved
local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained(train.demo_paths(tiny(A)), {torch_dtype = "float32",
    components_to_load = {"transformer"}})
local base_sd = pipe.transformer:state_dict()
local trained = sA.model:state_dict()
local base_same, lora_moved = true, false
for k, v in pairs(trained) do
    if k:find("lora_B", 1, true) then
        if v:abs():sum():item() > 0 then lora_moved = true end
    elseif not k:find("lora_", 1, true) then
        if not T.same_bits(v, base_sd[k]) then base_same = false end
    end
end
T.ok(base_same, "after training every base weight equals the pretrained one bit for bit")
T.ok(lora_moved, "and the adapters' B matrices moved away from zero")
do
    local sL = run(tiny(tmp .. "/runL", {["step_scheduler.max_steps"] = 80, ["checkpoint.enabled"] = false}))
    T.ok(sL.last_mean_loss < sL.first_mean_loss, string.format("80 LoRA steps lower the loss (means of 10 steps): " ..
         "%.4f -> %.4f", sL.first_mean_loss, sL.last_mean_loss))
end
-- the adapter applied to the base reproduces the trained model
peft.load_adapter(pipe.transformer, final .. "/model")
local ti = {hidden_states = rnd({1, 16, 16}, 40, "float32"), encoder_hidden_states = rnd({1, 4, 16}, 41, "float32"),
            pooled_projections = rnd({1, 16}, 42, "float32"), timestep = nemo.tensor({0.5}),
            guidance = nemo.tensor({1.0}), img_ids = nemo.zeros({16, 3}), txt_ids = nemo.zeros({4, 3})}
sA.model:eval(); pipe.transformer:eval()
T.ok(T.same_bits(pipe.transformer(ti), sA.model(ti)),
     "the saved adapter loaded onto the pretrained model reproduces the trained model bit for bit")
-- resume: 5 steps, stop, 5 more == 10 at once
local B_ = tmp .. "/runB"
run(tiny(B_), {stop_after = 5})
local sB = run(tiny(B_))
T.ok(sB.resumed_from and fs.read(sB.checkpoint .. "/model/adapter_model.safetensors") ==
     fs.read(final .. "/model/adapter_model.safetensors"),
     "a LoRA run stopped after 5 steps and resumed ends with the same adapter bit for bit")
-- bad blocks
local function raises_cfg(over, pat, name)
    T.raises(function() run(tiny(tmp .. "/bad", over)) end, pat, name)
end
raises_cfg({["model.model_type"] = json.null}, "model.model_type must be set", "peft without model.model_type")
raises_cfg({["model.model_type"] = "sd3"}, "model.model_type 'sd3' is not one", "an unknown model_type")
raises_cfg({["model.model_type"] = "wan"}, "names a WanTransformer3DModel", "a model_type that is not the model's class")
raises_cfg({["peft.target_modules"] = {"*.nothing"}}, "no Linear layer of the FluxTransformer2DModel matches",
           "targets that match nothing")
raises_cfg({["peft.dimm"] = 3}, "unknown key dimm", "an unknown peft key")
raises_cfg({["model.compute_dtype"] = "bfloat16", ["fsdp"] = {dp_size = 1}}, "must match for PEFT/LoRA",
           "split torch_dtype / compute_dtype with peft (Automodel's rule)")
raises_cfg({["model.mode"] = "pretrain"}, "needs model.mode finetune", "peft on a pretraining run")

-- Automodel's own LoRA config (examples/diffusion/finetune/flux_t2i_flow_lora.yaml, its model,
-- peft and ddp blocks) validates as it is
do
    local yaml = require "nemo.yaml"
    local c = yaml.load([[
model:
  pretrained_model_name_or_path: "black-forest-labs/FLUX.1-dev"
  model_type: "flux"
  mode: "finetune"
  cache_dir: null
  attention_backend: "flash"
  transformer_engine_fp8: false
peft:
  _target_: nemo_automodel.components._peft.lora.PeftConfig
  dim: 64
  alpha: 64
  dropout: 0.0
  target_modules:
    - "*.attn.to_q"
    - "*.attn.to_k"
    - "*.attn.to_v"
    - "*.attn.to_out.0"
    - "*.attn.add_q_proj"
    - "*.attn.add_k_proj"
    - "*.attn.add_v_proj"
    - "*.attn.to_add_out"
    - "*.ff.net.0.proj"
    - "*.ff.net.2"
    - "*.ff_context.net.0.proj"
    - "*.ff_context.net.2"
optimizer:
  _target_: torch.optim.AdamW
  lr: 2e-5
  weight_decay: 0.01
  betas: [0.9, 0.999]
  foreach: false
  fused: true
ddp:
  backend: "nccl"
  activation_checkpointing: false
step_scheduler:
  global_batch_size: 8
  local_batch_size: 1
  num_epochs: 1
data:
  dataloader:
    _target_: nemo_automodel.components.datasets.diffusion.build_text_to_image_multiresolution_dataloader
    cache_dir: /data
checkpoint:
  enabled: true
]])
    local ok, err = pcall(train.validate, c)
    T.ok(ok, "Automodel's flux_t2i_flow_lora.yaml (model, peft, optimizer, ddp blocks) validates", err)
end

fs.remove_tree(tmp)
T.done()
