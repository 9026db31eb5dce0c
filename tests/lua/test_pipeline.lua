-- NeMoAutoDiffusionPipeline and PipelineSpec: from_pretrained (folders, the HF cache layout,
-- skipped components), from_config (shipped configs), save_pretrained, helpers, errors.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local pipeline = require "nemo.pipeline"
local fs = require "nemo.fs"
local json = require "nemo.json"

local P, Spec = pipeline.NeMoAutoDiffusionPipeline, pipeline.PipelineSpec
local tmp = os.tmpname()
os.remove(tmp)
fs.mkdirs(tmp)

-- PipelineSpec
local s = Spec.from_dict(nil)
T.is(s.subfolder, "transformer", "spec default subfolder")
T.is(s.load_full_pipeline, false, "spec default load_full_pipeline")
T.is(s.enable_gradient_checkpointing, true, "spec default enable_gradient_checkpointing")
T.is(s.low_cpu_mem_usage, true, "spec default low_cpu_mem_usage")
T.is(Spec.from_dict({transformer_cls = "FluxTransformer2DModel"}).transformer_cls, "FluxTransformer2DModel", "spec field")
T.raises(function() Spec.from_dict({transformer_class = "x"}) end, "unknown key 'transformer_class'", "unknown spec key")
T.raises(function() Spec.from_dict({load_full_pipeline = "yes"}) end, "'load_full_pipeline' must be a boolean", "wrong type")
T.raises(function() Spec.from_dict({}):validate_for_from_config() end, "transformer_cls is required", "validate_for_from_config")

-- class registry and helpers
T.ok(pipeline._import_diffusers_class("FluxTransformer2DModel") ~= nil, "_import_diffusers_class finds Flux")
T.raises(function() pipeline._import_diffusers_class("UNet2DConditionModel") end, "known classes: .*FluxTransformer2DModel",
    "unknown class lists the known ones")
T.is(pipeline._choose_device(), "cpu", "_choose_device without CUDA is cpu")

-- a small FLUX config folder, built with from_config
local small = {_class_name = "FluxTransformer2DModel", num_layers = 1, num_single_layers = 1, attention_head_dim = 8,
               num_attention_heads = 2, in_channels = 8, joint_attention_dim = 12, pooled_projection_dim = 10,
               axes_dims_rope = {2, 2, 4}}
fs.mkdirs(tmp .. "/cfg/transformer")
json.write_file(tmp .. "/cfg/transformer/config.json", small)
nemo.manual_seed(0)
local pipe, managers = P.from_config(tmp .. "/cfg", {transformer_cls = "FluxTransformer2DModel"}, {torch_dtype = "float32"})
T.ok(pipe.transformer ~= nil and next(managers) == nil, "from_config returns the transformer wrapper and no managers")
local n, trainable = 0, 0
for _, p in pipe.transformer:named_parameters() do n = n + 1; if p.requires_grad then trainable = trainable + 1 end end
T.ok(n > 0 and trainable == n, "from_config: every parameter trainable")
T.is(pipe.transformer.x_embedder.weight.dtype, "float32", "from_config casts to torch_dtype")
T.is(pipe.transformer.gradient_checkpointing, true, "gradient checkpointing enabled by the spec default")
local p2 = P.from_config(tmp .. "/cfg", {transformer_cls = "FluxTransformer2DModel", enable_gradient_checkpointing = false},
    {torch_dtype = "float32"})
T.is(p2.transformer.gradient_checkpointing, false, "spec enable_gradient_checkpointing = false")
T.raises(function() P.from_config(tmp .. "/cfg", {transformer_cls = "Nope"}, {torch_dtype = "float32"}) end,
    "unknown model class 'Nope'", "from_config with an unknown class")
for _, cls in ipairs {"FlowMatchEulerDiscreteScheduler", "AutoencoderKL"} do
    T.raises(function() P.from_config(tmp .. "/cfg", {transformer_cls = cls}, {torch_dtype = "float32"}) end,
        "transformer_cls '" .. cls .. "' is not a transformer model", "from_config: " .. cls .. " is not a transformer_cls")
end
T.raises(function() P.from_config(tmp .. "/nowhere", {transformer_cls = "FluxTransformer2DModel"}) end,
    "not found; looked in", "from_config with a missing folder says where it looked")
do
    local p3, mgrs = P.from_config(tmp .. "/cfg", {transformer_cls = "FluxTransformer2DModel"},
        {torch_dtype = "float32", parallel_scheme = {transformer = {}}})
    T.ok(mgrs.transformer ~= nil and mgrs.transformer.manager_type == "fsdp2" and mgrs.transformer.module == p3.transformer,
        "from_config with parallel_scheme {transformer = {}}: an FSDP2 manager (the default) wraps the transformer " ..
        "(one process: its own process group)")
    T.raises(function() P.from_config(tmp .. "/cfg", {transformer_cls = "FluxTransformer2DModel"},
        {parallel_scheme = {transformer = {tp_size = 2}}}) end, "tp_size", "a parallel_scheme with tp_size 2 is refused, naming the key")
end
T.raises(function() P.from_config(tmp .. "/cfg", {transformer_cls = "FluxTransformer2DModel"}, {torch_dtype = "float8"}) end,
    "unknown dtype 'float8'", "unknown torch_dtype")

-- shipped configs: FLUX.1-dev builds offline (checked on the config only: 12B parameters)
local cfg = pipeline._read_component_config("black-forest-labs/FLUX.1-dev", "transformer")
T.is(cfg.num_layers, 19, "shipped FLUX.1-dev config: 19 double blocks")
T.is(cfg.guidance_embeds, true, "shipped FLUX.1-dev config: guidance")
T.is(pipeline._read_component_config("black-forest-labs/FLUX.1-schnell", "transformer").guidance_embeds, false,
    "shipped FLUX.1-schnell config")
T.is(pipeline._read_component_config("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "transformer").num_layers, 30, "shipped Wan 1.3B config")

-- save_pretrained -> a diffusers pipeline folder; with a passthrough component
pipe.class_name = "FluxPipeline"
local out = tmp .. "/saved"
pipe:save_pretrained(out)
T.ok(fs.isfile(out .. "/model_index.json") and fs.isfile(out .. "/transformer/config.json") and
     fs.isfile(out .. "/transformer/diffusion_pytorch_model.safetensors"), "save_pretrained writes the diffusers layout")
local idx = json.read_file(out .. "/model_index.json")
T.is(idx._class_name, "FluxPipeline", "model_index _class_name")
T.is(idx.transformer[2], "FluxTransformer2DModel", "model_index transformer entry")
-- add a VAE (implemented: a tiny AutoencoderKL) and a component nemo-lua does not implement,
-- as a real pipeline folder has
nemo.manual_seed(1)
local vae_src = require("nemo.models.vae").AutoencoderKL({block_out_channels = {4, 8}, layers_per_block = 1,
    norm_num_groups = 2, latent_channels = 4, down_block_types = {"DownEncoderBlock2D", "DownEncoderBlock2D"},
    up_block_types = {"UpDecoderBlock2D", "UpDecoderBlock2D"}, use_quant_conv = false, use_post_quant_conv = false,
    scaling_factor = 0.3611, shift_factor = 0.1159})
vae_src:save_pretrained(out .. "/vae")
idx.vae = {"diffusers", "AutoencoderKL"}
fs.mkdirs(out .. "/text_encoder")
json.write_file(out .. "/text_encoder/config.json", {architectures = {"CLIPTextModelWithProjection"}, hidden_size = 32})
idx.text_encoder = {"transformers", "CLIPTextModelWithProjection"}   -- (SD3's; not in nemo-lua)
idx.image_encoder = {json.null, json.null}
json.write_file(out .. "/model_index.json", idx)

local loaded = P.from_pretrained(out, {torch_dtype = "float32"})
T.ok(loaded.transformer ~= nil, "from_pretrained loads the transformer")
T.ok(loaded.vae ~= nil and loaded.skipped.vae == nil and loaded.vae.config.shift_factor == 0.1159,
    "from_pretrained loads the VAE (AutoencoderKL) as a module, with its config")
T.close(loaded.vae.decoder.conv_out.weight:detach(), vae_src.decoder.conv_out.weight:detach(), 0, 0,
    "the VAE's weights are the saved ones")
T.ok(loaded.skipped.text_encoder ~= nil, "the text encoder (no implementation yet) is listed as skipped")
T.is(loaded.components.image_encoder, nil, "[null, null] components are absent")
local frozen = true
for _, p in loaded.transformer:named_parameters() do if p.requires_grad then frozen = false end end
T.ok(frozen, "without load_for_training the parameters are frozen")
local tl = P.from_pretrained(out, {torch_dtype = "float32", load_for_training = true})
local all = true
for _, p in tl.transformer:named_parameters() do if not p.requires_grad then all = false end end
T.ok(all, "load_for_training makes every parameter trainable")
local bf = P.from_pretrained(out, {torch_dtype = "bfloat16"})
T.is(bf.transformer.x_embedder.weight.dtype, "bfloat16", "torch_dtype default path casts (bfloat16)")
-- same weights as saved
local a = pipe.transformer.proj_out.weight:detach()
local b = loaded.transformer.proj_out.weight:detach()
T.close(b, a, 0, 0, "weights round trip through save_pretrained / from_pretrained")
T.raises(function() P.from_pretrained(out, {components_to_load = {"text_encoder"}}) end,
    "no implementation of CLIPTextModelWithProjection yet", "asking for an unimplemented component is an error")
do
    local only_vae = P.from_pretrained(out, {torch_dtype = "float32", components_to_load = {"vae"}})
    T.ok(only_vae.vae ~= nil and only_vae.transformer == nil, "components_to_load = {'vae'} loads the VAE alone")
end
T.raises(function() P.from_pretrained(out, {components_to_load = {"unet"}}) end, "does not list",
    "asking for an absent component is an error")
T.raises(function() P.from_pretrained(out, {torch_dtyp = "float32"}) end, "unknown option 'torch_dtyp'", "unknown option")
T.raises(function() P.from_pretrained(tmp .. "/cfg") end, "no model_index.json", "a folder without model_index.json")
T.raises(function() P.from_pretrained(out .. "/transformer") end, "single model folder", "a model folder hints at the model class")

-- save again: the text encoder folder is carried through, the VAE is saved by its model
local out2 = tmp .. "/saved2"
loaded:save_pretrained(out2)
T.ok(fs.isfile(out2 .. "/text_encoder/config.json"), "save_pretrained copies components it did not load")
T.is(json.read_file(out2 .. "/model_index.json").text_encoder[2], "CLIPTextModelWithProjection",
    "and lists them in model_index.json")
T.ok(fs.isfile(out2 .. "/vae/diffusion_pytorch_model.safetensors") and
     json.read_file(out2 .. "/model_index.json").vae[2] == "AutoencoderKL" and
     json.read_file(out2 .. "/vae/config.json").scaling_factor == 0.3611,
    "save_pretrained writes the loaded VAE (weights, config, model_index entry)")
-- overwrite keeps a complete folder
loaded:save_pretrained(out2)
T.ok(fs.isfile(out2 .. "/transformer/diffusion_pytorch_model.safetensors"), "saving over an existing folder")

-- Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>}
local hub = tmp .. "/hub"
local snap = hub .. "/models--acme--tiny-flux/snapshots/abc123"
fs.copy_tree(out, snap)
fs.mkdirs(hub .. "/models--acme--tiny-flux/refs")
local f = io.open(hub .. "/models--acme--tiny-flux/refs/main", "w"); f:write("abc123"); f:close()
local ffi = require "ffi"
ffi.cdef "int setenv(const char *, const char *, int);"
ffi.C.setenv("HF_HUB_CACHE", hub, 1)
local cached = P.from_pretrained("acme/tiny-flux", {torch_dtype = "float32"})
T.ok(cached.transformer ~= nil, "an org/name id resolves in HF_HUB_CACHE")
T.raises(function() P.from_pretrained("acme/missing-model") end, "models%-%-acme%-%-missing%-model",
    "a missing id names the cache folders it looked in")

fs.remove_tree(tmp)
T.done()
