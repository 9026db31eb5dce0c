-- lua/nemo/generate.lua: sampling from a pretrained pipeline or a training checkpoint, driven by
-- NeMo Automodel's generate configs (examples/diffusion/generate/configs/generate_*.yaml); what
-- recipes/generate.lua runs:
--
--   nemo-lua recipes/generate.lua -c recipes/generate_wan.yaml \
--       [--model.checkpoint runs/wan_finetune/LATEST] [--model.lora_weights runs/wan_lora/epoch_0_step_99/model] \
--       [--inference.prompts '["a dog running on a beach"]']
--
-- Config (Automodel's keys): model.pretrained_model_name_or_path; model.checkpoint (a training
-- checkpoint, its checkpoint_dir or a LATEST file: the transformer's weights) or, for Wan 2.2,
-- model.checkpoint_high_noise (-> transformer) / checkpoint_low_noise (-> transformer_2);
-- model.lora_weights (an adapter folder, <checkpoint>/model of a LoRA run) and lora_scale [1];
-- inference.dtype [bfloat16], prompts, max_samples, num_inference_steps, guidance_scale, height,
-- width, pipeline_kwargs (negative_prompt, num_frames, guidance_scale_2, max_sequence_length,
-- true_cfg_scale: handed to nemo.sampling); output.output_dir [./inference_outputs], output.fps
-- [16], output.video_format [mp4], output.video_qp [20] and output.video_keyint [250] (nemo-lua's:
-- mp4 or apng; the MP4's quantizer 0..51 and frames between IDR pictures, 1 = all intra);
-- vae.enable_slicing, vae.enable_tiling; seed
-- [42]; device [auto] (nemo-lua's). Prompt i samples with nemo.Generator(seed + i) and is written as
-- output_dir/sample_<iii>_<prompt>.<ext>: a PNG for FluxPipeline, an MP4 for WanPipeline as Automodel
-- (H.264 with P pictures, nemo.mp4) or with video_format apng an animated PNG. inference.input_images: one image path, or one per prompt, for image-to-video (a
-- WanImageToVideoPipeline, or Wan 2.2 TI2V; the image is the first frame). Not supported (clear errors): other
-- image-conditioned pipelines, pp_size; vae.enable_cpu_offload is noted and ignored.
--
-- Several processes (mpirun / srun / nemo-lua --nproc-per-node N, with a `distributed:` block
-- as Automodel's generate.py: backend, timeout_minutes, parallel_scheme.<component>.cp_size /
-- tp_size / dp_size): the processes form dp = N / (cp x tp) groups of cp x tp ranks; group d
-- samples prompts d, d + dp, ... (the same Generator(seed + i) as one process), its cp ranks
-- splitting each sample's tokens (nemo.parallel.context: the named transformers run
-- enable_context_parallel) and its tp ranks the transformers' largest layers
-- (enable_tensor_parallel: each device holds its slice; the pipeline is read on the CPU,
-- memory-mapped, and moved after the split; a LoRA adapter is merged first); the group's first
-- rank writes the files. Without tp_size every rank loads the whole pipeline onto its device.
local fs = require "nemo.fs"

local M = {}

M.SCHEMA = {
    seed = "number", device = "string",
    model = {pretrained_model_name_or_path = "string", checkpoint = "string", checkpoint_high_noise = "string",
             checkpoint_low_noise = "string", lora_weights = "string", lora_scale = "number",
             lora_adapter_name = "string"},
    inference = {dtype = "string", prompts = "table", max_samples = "number", num_inference_steps = "number",
                 guidance_scale = "number", height = "number", width = "number", pipeline_kwargs = "table",
                 input_images = "table"},
    output = {output_dir = "string", fps = "number", video_format = "string", video_qp = "number",
              video_keyint = "number"},
    vae = {enable_slicing = "boolean", enable_tiling = "boolean", enable_cpu_offload = "boolean"},
    distributed = {backend = "string", timeout_minutes = "number", parallel_scheme = "table"},
}

-- the keys a distributed.parallel_scheme component takes (Automodel's generate.py copies the sizes
-- and adds backend, world_size and use_hf_tp_plan itself; nemo-lua accepts and ignores those three)
local SCHEME_KEYS = {cp_size = true, dp_size = true, dp_replicate_size = true, tp_size = true, pp_size = true,
                     backend = true, world_size = true, use_hf_tp_plan = true}

local function cfg_error(msg) error("generate config: " .. msg, 0) end

-- validate(cfg): the schema, then the rules Automodel's generate.py applies
function M.validate(cfg)
    require("nemo.train").check_section("", cfg, M.SCHEMA)   -- unknown keys and types, as the training configs
    local m, inf = cfg.model or {}, cfg.inference or {}
    if not m.pretrained_model_name_or_path then cfg_error("model.pretrained_model_name_or_path is required") end
    if m.checkpoint and (m.checkpoint_high_noise or m.checkpoint_low_noise) then
        cfg_error("model.checkpoint is mutually exclusive with model.checkpoint_high_noise / " ..
            "model.checkpoint_low_noise (the pair is for Wan 2.2's two transformers, model.checkpoint for one)")
    end
    local prompts = inf.prompts
    if type(prompts) ~= "table" or #prompts == 0 then cfg_error("inference.prompts must be a non-empty list of strings") end
    for i, p in ipairs(prompts) do
        if type(p) ~= "string" then cfg_error(string.format("inference.prompts[%d] must be a string, got %s", i, type(p))) end
    end
    if inf.max_samples ~= nil and (inf.max_samples < 1 or inf.max_samples % 1 ~= 0) then
        cfg_error("inference.max_samples must be a positive integer, got " .. tostring(inf.max_samples))
    end
    if inf.input_images ~= nil then
        local ii = inf.input_images
        local ok = type(ii) == "table" and #ii >= 1
        for _, v in ipairs(type(ii) == "table" and ii or {}) do ok = ok and type(v) == "string" end
        if not ok then cfg_error("inference.input_images must be a non-empty list of image paths (PNG or JPEG)") end
        if type(inf.prompts) == "table" and #ii ~= 1 and #ii ~= #inf.prompts then
            cfg_error(string.format("inference.input_images has %d images for %d prompts (give one image, or one per " ..
                "prompt)", #ii, #inf.prompts))
        end
    end
    local d = cfg.distributed
    if d ~= nil then
        if d.backend ~= nil and not ({nccl = 1, mpi = 1, gloo = 1})[d.backend] then
            cfg_error("distributed.backend must be nccl, mpi or gloo, got " .. tostring(d.backend))
        end
        if d.timeout_minutes ~= nil and not (d.timeout_minutes > 0) then
            cfg_error("distributed.timeout_minutes must be > 0, got " .. tostring(d.timeout_minutes))
        end
        for name, sc in pairs(d.parallel_scheme or {}) do
            if type(sc) ~= "table" then
                cfg_error(string.format("distributed.parallel_scheme.%s must be a table of sizes (cp_size, dp_size)",
                    tostring(name)))
            end
            for k, v in pairs(sc) do
                if not SCHEME_KEYS[k] then
                    cfg_error(string.format("unknown key 'distributed.parallel_scheme.%s.%s' (known: cp_size, " ..
                        "dp_size, dp_replicate_size, tp_size, pp_size)", tostring(name), tostring(k)))
                end
                if k == "pp_size" and type(v) == "number" and v > 1 then
                    cfg_error(string.format("distributed.parallel_scheme.%s.%s = %d: pipeline parallelism is not " ..
                        "supported in nemo-lua; cp_size (context parallelism) splits a sample's tokens and tp_size " ..
                        "(tensor parallelism) its layers over ranks", tostring(name), k, v))
                end
            end
        end
    end
    local vf = cfg.output and cfg.output.video_format
    if vf ~= nil and vf ~= "mp4" and vf ~= "apng" then
        cfg_error("output.video_format must be mp4 (H.264, Automodel's format) or apng (an animated PNG), got " ..
            tostring(vf))
    end
    local vq = cfg.output and cfg.output.video_qp
    local vq_why = vq ~= nil and require("nemo.mp4").qp_problem(vq, "output.video_qp")
    if vq_why then cfg_error(vq_why) end
    local vk = cfg.output and cfg.output.video_keyint
    local vk_why = vk ~= nil and require("nemo.mp4").keyint_problem(vk, "output.video_keyint")
    if vk_why then cfg_error(vk_why) end
    if inf.dtype ~= nil and not ({bfloat16 = 1, float16 = 1, float32 = 1})[inf.dtype] then
        cfg_error("inference.dtype must be bfloat16, float16 or float32, got " .. tostring(inf.dtype))
    end
end

-- load_config(path, overrides) -> cfg: train.read_config's (YAML, --section.key overrides, nulls
-- removed), validated
function M.load_config(path, overrides)
    local cfg = require("nemo.train").read_config(path, overrides)
    -- Automodel's command lines write Python's None (--model.checkpoint_low_noise None)
    for _, k in ipairs{"checkpoint", "checkpoint_high_noise", "checkpoint_low_noise", "lora_weights"} do
        if type(cfg.model) == "table" and cfg.model[k] == "None" then cfg.model[k] = nil end
    end
    M.validate(cfg)
    return cfg
end

-- the file name Automodel gives sample i: alphanumerics, space, _ and - kept, 50 characters,
-- stripped, spaces -> _
function M.sample_name(i, prompt, ext)
    local safe = prompt:gsub("[^%w _%-]", ""):sub(1, 50):gsub("^%s+", ""):gsub("%s+$", ""):gsub(" ", "_")
    return string.format("sample_%03d_%s.%s", i, safe, ext)
end

-- The distributed: block -> the process group and the layout {world, cp, tp, dp, cp_rank, tp_rank,
-- dp_rank, group (the cp group), tp_group, components (the names with cp_size > 1),
-- tp_components (with tp_size > 1)}, or nil without the block. The ranks form dp groups of
-- cp x tp ranks (nemo.parallel.mesh: tp fastest); each dp group samples its share of the prompts,
-- its cp ranks together, one token slice each, its tp ranks one slice of the split layers each.
local function distributed_layout(cfg, device)
    local d = cfg.distributed
    if d == nil then return nil end
    local dist = require "nemo.dist"
    local ok, err = pcall(dist.init_for_device, device, d)
    if not ok then error("generate: distributed: " .. tostring(err), 0) end
    local world = dist.get_world_size()
    local dp
    local size, names = {cp_size = 1, tp_size = 1}, {cp_size = {}, tp_size = {}}
    local comps = {}
    for name in pairs(d.parallel_scheme or {}) do comps[#comps + 1] = name end
    table.sort(comps)
    for _, name in ipairs(comps) do
        local sc = d.parallel_scheme[name]
        for _, key in ipairs { "cp_size", "tp_size" } do
            local c = type(sc[key]) == "number" and sc[key] > 1 and sc[key] or 1
            if c > 1 then
                if size[key] > 1 and c ~= size[key] then
                    cfg_error(string.format("distributed.parallel_scheme: the components' %s differ (%d and %d); the " ..
                        "transformers of a pipeline sample together, so give them one %s", key, size[key], c, key))
                end
                size[key] = c
                names[key][#names[key] + 1] = name
            end
        end
        if type(sc.dp_size) == "number" and sc.dp_size > 0 then dp = sc.dp_size end
    end
    local cp, tp = size.cp_size, size.tp_size
    local sizes = {}   -- "cp_size 2", "cp_size 2 x tp_size 2": the model-parallel sizes given
    if cp > 1 or tp == 1 then sizes[#sizes + 1] = "cp_size " .. cp end
    if tp > 1 then sizes[#sizes + 1] = "tp_size " .. tp end
    sizes = table.concat(sizes, " x ")
    if world % (cp * tp) ~= 0 then
        cfg_error(string.format("distributed.parallel_scheme: %s does not divide the %d processes", sizes, world))
    end
    if dp ~= nil and dp * cp * tp ~= world then
        cfg_error(string.format("distributed.parallel_scheme: dp_size %d x %s does not match the %d processes (leave " ..
            "dp_size out to infer it)", dp, sizes, world))
    end
    local mesh = require("nemo.parallel.mesh").DeviceMesh{cp_size = cp, tp_size = tp}
    return {world = world, cp = cp, tp = tp, dp = mesh:size("dp"), cp_rank = mesh:get_local_rank("cp"),
            tp_rank = mesh:get_local_rank("tp"), dp_rank = mesh:get_local_rank("dp"), group = mesh:get_group("cp"),
            tp_group = mesh:get_group("tp"), components = names.cp_size, tp_components = names.tp_size, mesh = mesh}
end

-- run(cfg, {log = fn}) -> {files = {...}, pipe = pipe}: the files this process wrote (with a
-- distributed: block, each dp group's first cp rank writes its prompts' samples)
function M.run(cfg, opts)
    opts = opts or {}
    local log = opts.log or function(msg) io.stdout:write(msg, "\n"); io.stdout:flush() end
    M.validate(cfg)
    local nemo = require "nemo"
    local m, inf, out = cfg.model, cfg.inference, cfg.output or {}
    local device = cfg.device
    if cfg.distributed and (device == nil or device == "auto" or device == "cuda") then
        -- one device per process: cuda:LOCAL_RANK from the launcher (mpirun, srun, torchrun)
        local cuda_ok = nemo.cuda and nemo.cuda.is_available()
        device = cuda_ok and ("cuda:" .. require("nemo.dist").env().local_rank) or (device == "cuda" and device or "cpu")
    end
    local lay = distributed_layout(cfg, device or "auto")
    local writer = lay == nil or (lay.cp_rank == 0 and lay.tp_rank == 0)
    if not writer then log = function() end end
    if lay and lay.world > 1 and require("nemo.dist").get_rank() == 0 then   -- once, not once per group
        local per = lay.cp * lay.tp
        log(string.format("distributed: %d processes, %d prompt group%s of %d (context parallel over %s%s)", lay.world,
            lay.dp, lay.dp == 1 and "" or "s", per, #lay.components > 0 and table.concat(lay.components, ", ") or
            (per == 1 and "nothing: each process samples its own prompts" or "nothing"),
            #lay.tp_components > 0 and ("; tensor parallel over " .. table.concat(lay.tp_components, ", ")) or ""))
    end
    if cfg.vae and cfg.vae.enable_cpu_offload then log("note: vae.enable_cpu_offload is ignored (a PyTorch hook)") end
    -- with tensor parallelism the pipeline loads on the CPU (memory-mapped) and moves to the device
    -- after the split: a device holds its slice, never the whole transformer
    local tp_split = lay and #lay.tp_components > 0
    local load_device = device
    if tp_split then
        load_device = "cpu"
        if device == nil or device == "auto" then device = nemo.pipeline._choose_device() end
    end
    local pipe = nemo.sampling.open_pipeline(m.pretrained_model_name_or_path,
        {dtype = inf.dtype or "bfloat16", device = load_device})
    local c = pipe.components
    local kind = pipe.class_name == "FluxPipeline" and "image" or
        (pipe.class_name == "WanPipeline" or pipe.class_name == "WanImageToVideoPipeline") and "video" or nil
    if not kind then
        error(string.format("generate: %s is a %s; nemo-lua samples FluxPipeline, WanPipeline and WanImageToVideoPipeline", m.pretrained_model_name_or_path,
            tostring(pipe.class_name)), 0)
    end
    local ck = require "nemo.checkpoint"
    local function load_into(slot, path, key)
        if not c[slot] then
            error(string.format("generate: model.%s is set but the pipeline has no %s (it applies to two-transformer " ..
                "pipelines such as Wan2.2-T2V-A14B)", key, slot), 0)
        end
        local dir = ck.load_weights(path, c[slot])
        log(string.format("loaded %s's weights from %s", slot, dir))
    end
    if m.checkpoint then load_into("transformer", m.checkpoint, "checkpoint") end
    if m.checkpoint_high_noise then load_into("transformer", m.checkpoint_high_noise, "checkpoint_high_noise") end
    if m.checkpoint_low_noise then load_into("transformer_2", m.checkpoint_low_noise, "checkpoint_low_noise") end
    if m.lora_weights and not fs.isdir(m.lora_weights) then
        error("generate: model.lora_weights: no folder at " .. m.lora_weights, 0)
    end
    nemo.sampling.ready_pipeline(pipe, {lora = m.lora_weights, lora_scale = m.lora_scale, log = log})
    if tp_split then
        for _, name in ipairs(lay.tp_components) do
            local comp = c[name]
            if comp == nil or type(comp.enable_tensor_parallel) ~= "function" then
                error(string.format("generate: distributed.parallel_scheme.%s has tp_size %d but the pipeline's %s %s",
                    name, lay.tp, name, comp == nil and "does not exist" or "has no tensor-parallel plan (the " ..
                    "transformers FluxTransformer2DModel and WanTransformer3DModel have one)"), 0)
            end
            -- a LoRA adapter is merged into the weights first (the split layers are plain Linears)
            if #require("nemo.peft").adapted_modules(comp) > 0 then require("nemo.peft").merge(comp) end
            comp:enable_tensor_parallel(lay.tp_group, {cp_size = lay.cp})
        end
        for _, mod in nemo.pipeline._iter_pipeline_modules(pipe) do
            nemo.pipeline._move_module_to_device(mod, device)
        end
    end
    for _, name in ipairs(lay and lay.components or {}) do
        local comp = c[name]
        if comp == nil or type(comp.enable_context_parallel) ~= "function" then
            error(string.format("generate: distributed.parallel_scheme.%s has cp_size %d but the pipeline's %s %s",
                name, lay.cp, name, comp == nil and "does not exist" or "cannot run context-parallel (the " ..
                "transformers FluxTransformer2DModel and WanTransformer3DModel can)"), 0)
        end
        comp:enable_context_parallel(lay.group)
    end
    if cfg.vae and cfg.vae.enable_slicing and c.vae and c.vae.enable_slicing then c.vae:enable_slicing() end
    if cfg.vae and cfg.vae.enable_tiling and c.vae and c.vae.enable_tiling then c.vae:enable_tiling() end
    local kwargs = {}
    for _, k in ipairs{"num_inference_steps", "guidance_scale", "height", "width"} do kwargs[k] = inf[k] end
    for k, v in pairs(inf.pipeline_kwargs or {}) do kwargs[k] = v end
    local prompts = inf.prompts
    local n = math.min(#prompts, inf.max_samples or #prompts)
    local dir = out.output_dir or "./inference_outputs"
    fs.mkdirs(dir)
    local seed = cfg.seed or 42
    local files = {}
    local sampling = nemo.sampling
    -- sample i: prompt i + 1 with Generator(seed + i), written by the writer ranks
    local function sample(i)
        local p = prompts[i + 1]
        log(string.format("[%d/%d] %s", i + 1, n, p:sub(1, 80)))
        local o = {pipe = pipe, prompt = p, generator = nemo.Generator(seed + i)}
        for k, v in pairs(kwargs) do o[k] = v end
        local ext = (kind == "video" and (out.video_format or "mp4") == "mp4") and "mp4" or "png"
        local path = dir .. "/" .. M.sample_name(i, p, ext)
        if inf.input_images then
            if kind ~= "video" or not (pipe.class_name == "WanImageToVideoPipeline" or
                (pipe.config and pipe.config.expand_timesteps == true)) then
                error(string.format("generate: inference.input_images needs an image-to-video pipeline: a " ..
                    "WanImageToVideoPipeline, or Wan 2.2 TI2V (model_index.json expand_timesteps = true); %s is a %s",
                    m.pretrained_model_name_or_path, tostring(pipe.class_name)), 0)
            end
            local ii = inf.input_images
            o.image = ii[#ii == 1 and 1 or i + 1]
        end
        if kind == "image" then
            local r = sampling.flux(o)
            if writer then nemo.image.save(path, (sampling.to_uint8(r.image))) end
        else
            local r = sampling.wan(o)
            if writer then nemo.image.save_video(path, sampling.video_frames(r.video, 1), {fps = out.fps or 16,
                qp = out.video_qp, keyint = out.video_keyint}) end
        end
        if writer then
            files[#files + 1] = path
            log("saved " .. path)
        end
    end
    for i = 0, n - 1 do
        if lay == nil or i % lay.dp == lay.dp_rank then sample(i) end   -- this dp group's share
    end
    -- every sample is on disk when any process returns
    if lay and lay.world > 1 then require("nemo.dist").barrier() end
    return {files = files, pipe = pipe}
end

-- main(args): recipes/generate.lua's command line (-c config, --section.key value overrides)
function M.main(args, o)
    local train = require "nemo.train"
    local a = train.parse_args(args)
    if a.help then
        io.stdout:write("usage: nemo-lua recipes/generate.lua -c CONFIG.yaml [--section.key value ...]\n")
        return
    end
    local path = a.config or (o and o.default_config)
    if not path then cfg_error("-c CONFIG.yaml is required (recipes/generate_flux.yaml, generate_wan.yaml)") end
    return M.run(M.load_config(path, a.overrides))
end

return M
