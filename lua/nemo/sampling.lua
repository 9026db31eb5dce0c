-- lua/nemo/sampling.lua: sampling loops of diffusers' pipelines, from prompts (with the
-- pipeline's tokenizers and text encoders) or from precomputed text embeddings.
--
--   local pipe = nemo.NeMoAutoDiffusionPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")
--   local out = nemo.sampling.flux{pipe = pipe, prompt = "a photo of a cat", height = 1024, width = 1024,
--       generator = nemo.Generator(0)}
--   nemo.image.save("cat.png", (nemo.sampling.to_uint8(out.image)))
--
--   local wan = nemo.NeMoAutoDiffusionPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
--   local v = nemo.sampling.wan{pipe = wan, prompt = "a cat walking on grass", generator = nemo.Generator(0)}
--   nemo.image.save_video("cat.png", nemo.sampling.video_frames(v.video))   -- an animated PNG
--
--   local sampling = require "nemo.sampling"
--   local out = sampling.flux{transformer = pipe.components.transformer, scheduler = pipe.components.scheduler,
--       vae = pipe.components.vae, prompt_embeds = pe, pooled_prompt_embeds = pooled,
--       height = 1024, width = 1024, num_inference_steps = 28, guidance_scale = 3.5,
--       generator = nemo.Generator(0), output_type = "image"}
--   -- out.latents: the final packed latents [B, N, 4C]; out.image: the decoded image [B, 3, H, W]
--   -- in [-1, 1]; sampling.to_uint8(out.image) -> [B, H, W, 3] values 0..255
--
-- M.flux mirrors diffusers 0.40 FluxPipeline.__call__ step by step, given prompt_embeds and
-- pooled_prompt_embeds (or prompts, encoded first); with negative prompts (or their embeddings)
-- and true_cfg_scale > 1 every step runs the transformer twice and uses neg + true_cfg_scale *
-- (pos - neg) (FluxPipeline's true CFG):
--   1. vae_scale_factor = 2 ^ (#vae.config.block_out_channels - 1) (8 without a VAE); the
--      latent grid is h = 2 * (height // (vae_scale_factor * 2)) (likewise w); C = in_channels / 4;
--   2. latents: opts.latents (packed [B, (h/2)(w/2), 4C] as FluxPipeline takes them, or unpacked
--      [B, C, h, w], packed here), cast to prompt_embeds' dtype; else randn [B, C, h, w] from
--      opts.generator (nemo's own Philox stream: NOT torch's numbers), packed;
--      img_ids = _prepare_latent_image_ids (prompt_embeds' dtype), txt_ids = zeros(L, 3)
--      (the transformer's dtype, as encode_prompt without a text encoder);
--   3. sigmas = np.linspace(1, 1/N, N) unless opts.sigmas; mu = calculate_shift(image_seq_len,
--      base_image_seq_len, max_image_seq_len, base_shift, max_shift) from the scheduler's config;
--      retrieve_timesteps(scheduler, N, {sigmas =, mu =}) (with sigmas, N is their count);
--   4. guidance = full([B], guidance_scale, float32) when transformer.config.guidance_embeds;
--   5. scheduler:set_begin_index(0); for each t: timestep = full([B], t, latents' dtype) / 1000,
--      noise_pred = transformer{...}, latents = scheduler:step(noise_pred, t, latents);
--   6. output_type "latent": image = the packed latents (as diffusers); "image": unpack,
--      latents / scaling_factor + shift_factor, vae:decode(...).sample (no postprocess; see
--      M.postprocess and M.to_uint8).
-- Everything runs under nemo.no_grad.
--
-- Where it differs from diffusers (on purpose): bad options are errors naming the option (an
-- unknown key, wrong shapes, latents of the wrong size, sigmas whose count disagrees with an
-- explicit num_inference_steps, output_type "image" without a VAE); a VAE config without
-- shift_factor (null) adds 0 where diffusers would fail on `+ None`; opts.callback(i, t, latents)
-- (i 0-based, t the timestep number, latents after the step) replaces callback_on_step_end.
require "nemo"
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"
local F = require "nemo.functional"
local json = require "nemo.json"
local FM = require "nemo.flow_matching"
local sched = require "nemo.schedulers.flow_match_euler"

local is_tensor, shape_str = Tensor.is_tensor, Tensor.shape_str

local M = {}

M.FLUX_OPTIONS = {"transformer", "scheduler", "vae", "prompt_embeds", "pooled_prompt_embeds", "height", "width",
    "num_inference_steps", "guidance_scale", "latents", "generator", "sigmas", "output_type", "callback",
    "pipe", "prompt", "prompt_2", "max_sequence_length", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2",
    "negative_prompt", "negative_prompt_2", "negative_prompt_embeds", "negative_pooled_prompt_embeds", "true_cfg_scale"}
M.ENCODE_OPTIONS = {"prompt", "prompt_2", "max_sequence_length", "tokenizer", "text_encoder", "tokenizer_2",
    "text_encoder_2"}
M.OUTPUT_TYPES = {"latent", "image"}
M.FLUX_DEFAULTS = {num_inference_steps = 28, guidance_scale = 3.5, output_type = "image", default_sample_size = 128}

local function err(msg, level) error("sampling.flux: " .. msg, (level or 1) + 1) end

local function is_null(v) return v == nil or v == json.null end

-- with_pipe(o, options, components, who, level) -> o's options checked against the known list,
-- and, given a pipe, a copy of o with the pipe's components filled in where o gives none (the
-- pipe itself stays, for its config)
local function with_pipe(o, options, components, who, level)
    local function fail(msg) error(who .. ": " .. msg, level + 1) end
    local known = {}
    for _, k in ipairs(options) do known[k] = true end
    for k in pairs(o) do
        if not known[k] then fail(string.format("unknown option '%s' (known: %s)", tostring(k), table.concat(options, ", "))) end
    end
    if o.pipe == nil then return o end
    local comps = type(o.pipe) == "table" and o.pipe.components
    if type(comps) ~= "table" then fail("pipe must be a NeMoAutoDiffusionPipeline") end
    local filled = {}
    for k, v in pairs(o) do filled[k] = v end
    for _, k in ipairs(components) do
        if filled[k] == nil then filled[k] = comps[k] end
    end
    return filled
end

local function posint(v) return type(v) == "number" and v >= 1 and v % 1 == 0 end

-- vae_scale_factor as FluxPipeline.__init__: 2 ** (len(block_out_channels) - 1) with a VAE, else 8
function M.flux_vae_scale_factor(vae)
    if vae == nil then return 8 end
    local boc = type(vae.config) == "table" and vae.config.block_out_channels
    if type(boc) ~= "table" or #boc < 1 then
        err("vae has no config.block_out_channels (expected an AutoencoderKL)", 2)
    end
    return 2 ^ (#boc - 1)
end

-- FluxPipeline._unpack_latents(latents, height, width, vae_scale_factor): pixel height / width
function M.flux_unpack_latents(latents, height, width, vsf)
    local h = 2 * math.floor(height / (vsf * 2))
    local w = 2 * math.floor(width / (vsf * 2))
    return FM.unpack_latents(latents, h, w)
end

-- The dtype and device of a module (its first parameter's).
local function module_dtype_device(m)
    for _, p in m:named_parameters() do return p.dtype, p.device end
    return "float32", "cpu"
end

-- FluxPipeline.encode_prompt: {prompt = string or list, prompt_2 = (T5's; default prompt),
-- tokenizer, text_encoder (CLIP), tokenizer_2, text_encoder_2 (T5), max_sequence_length = 512}
-- -> prompt_embeds [B, L, D] (text_encoder_2's dtype), pooled_prompt_embeds [B, P] (text_encoder's
-- dtype), the two tokenizations' input_ids. As diffusers: CLIP tokenized to its model_max_length
-- (77) with padding and truncation, pooler_output; T5 to max_sequence_length, last_hidden_state;
-- no attention masks are passed to either encoder.
function M.flux_encode_prompt(o)
    if type(o) ~= "table" then err("flux_encode_prompt: expected a table of options", 2) end
    local known = {}
    for _, k in ipairs(M.ENCODE_OPTIONS) do known[k] = true end
    for k in pairs(o) do
        if not known[k] then
            err(string.format("flux_encode_prompt: unknown option '%s' (known: %s)", tostring(k),
                table.concat(M.ENCODE_OPTIONS, ", ")), 2)
        end
    end
    local prompt = o.prompt
    if type(prompt) == "string" then prompt = {prompt} end
    if type(prompt) ~= "table" or #prompt == 0 then err("prompt must be a string or a list of strings", 2) end
    local prompt_2 = o.prompt_2 or prompt
    if type(prompt_2) == "string" then prompt_2 = {prompt_2} end
    if #prompt_2 ~= #prompt then
        err(string.format("prompt_2 has %d prompts, prompt %d", #prompt_2, #prompt), 2)
    end
    for _, k in ipairs{"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"} do
        if o[k] == nil then
            err(string.format("%s is required to encode prompts (load the pipeline with its text encoders and " ..
                "tokenizers, or pass prompt_embeds and pooled_prompt_embeds)", k), 2)
        end
    end
    local msl = o.max_sequence_length or 512
    if not posint(msl) or msl > 512 then err("max_sequence_length must be an integer in 1..512, got " .. tostring(msl), 2) end
    return autograd.no_grad(function()
        local dt1, dev1 = module_dtype_device(o.text_encoder)
        local t1 = o.tokenizer(prompt, {padding = "max_length", max_length = o.tokenizer.model_max_length or 77,
            truncation = true})
        local c = o.text_encoder{input_ids = t1.input_ids:to{device = dev1}}
        local pooled = (c.pooler_output or c[2]):to{dtype = dt1}
        local dt2, dev2 = module_dtype_device(o.text_encoder_2)
        local t2 = o.tokenizer_2(prompt_2, {padding = "max_length", max_length = msl, truncation = true})
        local e = o.text_encoder_2{input_ids = t2.input_ids:to{device = dev2}}
        local pe = (e.last_hidden_state or e[1]):to{dtype = dt2}
        return {prompt_embeds = pe, pooled_prompt_embeds = pooled, clip_input_ids = t1.input_ids,
                t5_input_ids = t2.input_ids}
    end)
end

local function run_flux(o)
    -- ---- the options; a pipeline fills in the components not given ----
    o = with_pipe(o, M.FLUX_OPTIONS, {"transformer", "scheduler", "vae", "tokenizer", "text_encoder", "tokenizer_2",
        "text_encoder_2"}, "sampling.flux", 4)
    local function encode(prompt, prompt_2)
        local enc = {}
        for _, k in ipairs(M.ENCODE_OPTIONS) do enc[k] = o[k] end
        enc.prompt, enc.prompt_2 = prompt, prompt_2
        local ok, r = pcall(M.flux_encode_prompt, enc)
        if not ok then error(r, 0) end
        return r
    end
    if o.prompt ~= nil then
        if o.prompt_embeds ~= nil or o.pooled_prompt_embeds ~= nil then
            err("give prompt or prompt_embeds / pooled_prompt_embeds, not both", 3)
        end
        local r = encode(o.prompt, o.prompt_2)
        local filled = {}
        for k, v in pairs(o) do filled[k] = v end
        filled.prompt_embeds, filled.pooled_prompt_embeds = r.prompt_embeds, r.pooled_prompt_embeds
        o = filled
    elseif o.prompt_2 ~= nil then
        err("prompt_2 needs prompt", 3)
    end
    -- true CFG (FluxPipeline's do_true_cfg): negative prompts and true_cfg_scale > 1
    local tcs = o.true_cfg_scale == nil and 1.0 or o.true_cfg_scale
    if type(tcs) ~= "number" or tcs ~= tcs then err("true_cfg_scale must be a number, got " .. tostring(tcs), 3) end
    local neg_pe, neg_pooled = o.negative_prompt_embeds, o.negative_pooled_prompt_embeds
    if o.negative_prompt ~= nil then
        if neg_pe ~= nil or neg_pooled ~= nil then
            err("give negative_prompt or negative_prompt_embeds / negative_pooled_prompt_embeds, not both", 3)
        end
        local np = o.negative_prompt
        if type(np) == "string" then np = {np} end
        local r = encode(np, o.negative_prompt_2)
        neg_pe, neg_pooled = r.prompt_embeds, r.pooled_prompt_embeds
    elseif o.negative_prompt_2 ~= nil then
        err("negative_prompt_2 needs negative_prompt", 3)
    end
    local do_true_cfg = tcs > 1 and neg_pe ~= nil and neg_pooled ~= nil
    if tcs > 1 and not do_true_cfg then
        io.stderr:write(string.format("nemo: warning: sampling.flux: true_cfg_scale is %g but no negative prompt was " ..
            "given; true CFG is off (as diffusers)\n", tcs))
    end
    if (neg_pe == nil) ~= (neg_pooled == nil) then
        err("negative_prompt_embeds and negative_pooled_prompt_embeds go together", 3)
    end
    local tr, sc, vae = o.transformer, o.scheduler, o.vae
    if type(tr) ~= "table" or type(tr.config) ~= "table" or tr.config.in_channels == nil then
        err("transformer is required (a FluxTransformer2DModel)", 3)
    end
    if type(sc) ~= "table" or type(sc.set_timesteps) ~= "function" or type(sc.step) ~= "function" then
        err("scheduler is required (a FlowMatchEulerDiscreteScheduler)", 3)
    end
    if vae ~= nil and (type(vae) ~= "table" or type(vae.decode) ~= "function") then
        err("vae must be an AutoencoderKL, got " .. type(vae), 3)
    end
    local pe, pooled = o.prompt_embeds, o.pooled_prompt_embeds
    if not is_tensor(pe) or pe.ndim ~= 3 then
        err("prompt_embeds is required: a [B, L, D] tensor" .. (is_tensor(pe) and ", got shape " .. shape_str(pe.shape) or
            ", got " .. type(pe)), 3)
    end
    if not is_tensor(pooled) or pooled.ndim ~= 2 then
        err("pooled_prompt_embeds is required: a [B, P] tensor" .. (is_tensor(pooled) and ", got shape " ..
            shape_str(pooled.shape) or ", got " .. type(pooled)), 3)
    end
    local B = pe.shape[1]
    if pooled.shape[1] ~= B then
        err(string.format("prompt_embeds (batch %d) and pooled_prompt_embeds (batch %d) must have the same batch size",
            B, pooled.shape[1]), 3)
    end
    local cfg = tr.config
    if cfg.joint_attention_dim and pe.shape[3] ~= cfg.joint_attention_dim then
        err(string.format("prompt_embeds must be [B, L, %d] (the transformer's joint_attention_dim), got %s",
            cfg.joint_attention_dim, shape_str(pe.shape)), 3)
    end
    if cfg.pooled_projection_dim and pooled.shape[2] ~= cfg.pooled_projection_dim then
        err(string.format("pooled_prompt_embeds must be [B, %d] (the transformer's pooled_projection_dim), got %s",
            cfg.pooled_projection_dim, shape_str(pooled.shape)), 3)
    end
    local output_type = o.output_type == nil and M.FLUX_DEFAULTS.output_type or o.output_type
    if output_type ~= "latent" and output_type ~= "image" then
        err(string.format("output_type must be \"latent\" or \"image\", got %s", tostring(output_type)), 3)
    end
    if output_type == "image" and vae == nil then
        err("output_type \"image\" needs a vae (pass vae=, or output_type = \"latent\")", 3)
    end
    local vsf = M.flux_vae_scale_factor(vae)
    local height = o.height or M.FLUX_DEFAULTS.default_sample_size * vsf
    local width = o.width or M.FLUX_DEFAULTS.default_sample_size * vsf
    if not posint(height) then err("height must be a positive integer (pixels), got " .. tostring(height), 3) end
    if not posint(width) then err("width must be a positive integer (pixels), got " .. tostring(width), 3) end
    local h = 2 * math.floor(height / (vsf * 2))
    local w = 2 * math.floor(width / (vsf * 2))
    if h < 2 or w < 2 then
        err(string.format("height x width %dx%d is too small: with vae_scale_factor %d it must be at least %d pixels " ..
            "each (one packed 2x2 latent patch)", height, width, vsf, vsf * 2), 3)
    end
    if height % (vsf * 2) ~= 0 or width % (vsf * 2) ~= 0 then
        io.stderr:write(string.format("nemo: warning: sampling.flux: height and width have to be divisible by %d but " ..
            "are %d and %d; dimensions will be resized accordingly (as diffusers)\n", vsf * 2, height, width))
    end
    local nsteps = o.num_inference_steps
    if nsteps ~= nil and not posint(nsteps) then
        err("num_inference_steps must be a positive integer, got " .. tostring(nsteps), 3)
    end
    local gs = o.guidance_scale == nil and M.FLUX_DEFAULTS.guidance_scale or o.guidance_scale
    if type(gs) ~= "number" or gs ~= gs then err("guidance_scale must be a number, got " .. tostring(gs), 3) end
    if o.callback ~= nil and type(o.callback) ~= "function" then
        err("callback must be a function(i, t, latents), got " .. type(o.callback), 3)
    end
    if o.generator ~= nil and getmetatable(o.generator) ~= Tensor.GeneratorClass then
        err("generator must be a nemo.Generator, got " .. type(o.generator), 3)
    end
    if cfg.in_channels % 4 ~= 0 then
        err(string.format("the transformer's in_channels (%d) is not a multiple of 4 (2x2 packed latents)", cfg.in_channels), 3)
    end
    local C = cfg.in_channels / 4
    if vae ~= nil and vae.config.latent_channels and vae.config.latent_channels ~= C then
        err(string.format("the vae has %d latent channels but the transformer takes %d (= in_channels / 4)",
            vae.config.latent_channels, C), 3)
    end

    -- ---- 4. prepare latent variables ----
    local dtype, device = pe.dtype, pe.device
    local N = (h / 2) * (w / 2)
    local latents
    if o.latents ~= nil then
        local l = o.latents
        if not is_tensor(l) then err("latents must be a tensor, got " .. type(l), 3) end
        if l.ndim == 4 then
            if l.shape[1] ~= B or l.shape[2] ~= C or l.shape[3] ~= h or l.shape[4] ~= w then
                err(string.format("unpacked latents must be [%d, %d, %d, %d] for %dx%d pixels, got %s", B, C, h, w,
                    height, width, shape_str(l.shape)), 3)
            end
            l = FM.pack_latents(l)
        elseif l.ndim == 3 then
            if l.shape[1] ~= B or l.shape[2] ~= N or l.shape[3] ~= 4 * C then
                err(string.format("packed latents must be [%d, %d, %d] for %dx%d pixels, got %s", B, N, 4 * C,
                    height, width, shape_str(l.shape)), 3)
            end
        else
            err("latents must be packed [B, N, 4C] or unpacked [B, C, h, w], got shape " .. shape_str(l.shape), 3)
        end
        latents = l:detach():to{dtype = dtype, device = device}
    else
        local x = Tensor.randn({B, C, h, w}, {dtype = dtype, device = device, generator = o.generator})
        latents = FM.pack_latents(x)
    end
    local img_ids = FM.latent_image_ids(h, w, {dtype = dtype, device = device})
    local tdt = type(tr.dtype) == "function" and tr:dtype() or dtype
    local txt_ids = Tensor.zeros({pe.shape[2], 3}, {dtype = tdt, device = device})
    local neg_txt_ids
    if do_true_cfg then
        if not is_tensor(neg_pe) or neg_pe.ndim ~= 3 or neg_pe.shape[1] ~= B or neg_pe.shape[3] ~= pe.shape[3] or
           not is_tensor(neg_pooled) or neg_pooled.ndim ~= 2 or neg_pooled.shape[1] ~= B or
           neg_pooled.shape[2] ~= pooled.shape[2] then
            err(string.format("negative prompt embeddings must be [%d, L, %d] and [%d, %d] (as the prompt's)", B,
                pe.shape[3], B, pooled.shape[2]), 3)
        end
        neg_txt_ids = Tensor.zeros({neg_pe.shape[2], 3}, {dtype = tdt, device = device})
    end

    -- ---- 5. timesteps ----
    local sigmas = o.sigmas
    if sigmas == nil then
        sigmas = sched.flux_sigmas(nsteps or M.FLUX_DEFAULTS.num_inference_steps)
    else
        local n = is_tensor(sigmas) and sigmas:numel() or (type(sigmas) == "table" and #sigmas or nil)
        if n == nil then err("sigmas must be a list of numbers or a 1-D tensor, got " .. type(sigmas), 3) end
        if n < 1 then err("sigmas must not be empty", 3) end
        if nsteps ~= nil and n ~= nsteps then
            err(string.format("sigmas has %d values but num_inference_steps is %d (leave num_inference_steps out " ..
                "to use the sigmas' count)", n, nsteps), 3)
        end
    end
    local sc_cfg = sc.config or {}
    local function c(k, d) local v = sc_cfg[k]; if is_null(v) then return d end; return v end
    local mu = sched.calculate_shift(N, c("base_image_seq_len", 256), c("max_image_seq_len", 4096),
        c("base_shift", 0.5), c("max_shift", 1.15))
    local ok, timesteps = pcall(sched.retrieve_timesteps, sc, nsteps, {sigmas = sigmas, mu = mu})
    if not ok then err(tostring(timesteps), 3) end
    local ts = timesteps:detach():to{device = "cpu"}:double():contiguous():reshape{-1}:tolist()

    -- ---- 6. the denoising loop ----
    local guidance
    if cfg.guidance_embeds then
        guidance = Tensor.full({B}, gs, {dtype = "float32", device = device})
    end
    sc:set_begin_index(0)
    for i, t in ipairs(ts) do
        local timestep = Tensor.full({B}, t, {dtype = latents.dtype, device = device})
        local noise_pred = tr{hidden_states = latents, timestep = timestep / 1000, guidance = guidance,
            pooled_projections = pooled, encoder_hidden_states = pe, txt_ids = txt_ids, img_ids = img_ids}
        if type(noise_pred) == "table" and not is_tensor(noise_pred) then noise_pred = noise_pred.sample or noise_pred[1] end
        if do_true_cfg then   -- neg + true_cfg_scale * (pos - neg)
            local neg = tr{hidden_states = latents, timestep = timestep / 1000, guidance = guidance,
                pooled_projections = neg_pooled, encoder_hidden_states = neg_pe, txt_ids = neg_txt_ids, img_ids = img_ids}
            if type(neg) == "table" and not is_tensor(neg) then neg = neg.sample or neg[1] end
            noise_pred = neg + (noise_pred - neg) * tcs
        end
        latents = sc:step(noise_pred, t, latents)
        if o.callback then o.callback(i - 1, t, latents) end
    end

    -- ---- 7. decode ----
    local out = {latents = latents, timesteps = timesteps, sigmas = sc.sigmas, mu = mu, vae_scale_factor = vsf,
                 latent_height = h, latent_width = w}
    if output_type == "latent" then
        out.image = latents
    else
        local z = FM.unpack_latents(latents, h, w)
        local vc = vae.config
        z = z / vc.scaling_factor
        if not is_null(vc.shift_factor) then z = z + vc.shift_factor end
        if type(vae.dtype) == "function" and z.dtype ~= vae:dtype() then z = z:to{dtype = vae:dtype()} end
        out.latents_unpacked = z
        out.image = vae:decode(z).sample
    end
    return out
end

-- flux(opts) -> {latents = final packed latents [B, N, 4C], image = [B, 3, H, W] in [-1, 1] (or the
-- packed latents for output_type "latent"), timesteps, sigmas, mu, vae_scale_factor,
-- latent_height, latent_width, latents_unpacked (the VAE's input, "image" only)}
function M.flux(opts)
    if type(opts) ~= "table" or is_tensor(opts) then err("expected a table of options", 2) end
    return autograd.no_grad(run_flux, opts)
end

-- ==== Wan (WanPipeline) ====

M.WAN_OPTIONS = {"pipe", "transformer", "transformer_2", "scheduler", "vae", "tokenizer", "text_encoder", "prompt",
    "negative_prompt", "prompt_embeds", "negative_prompt_embeds", "height", "width", "num_frames", "num_inference_steps",
    "guidance_scale", "guidance_scale_2", "boundary_ratio", "expand_timesteps", "max_sequence_length", "latents",
    "generator", "output_type", "callback", "image", "last_image", "image_encoder", "image_processor"}
M.WAN_DEFAULTS = {height = 480, width = 832, num_frames = 81, num_inference_steps = 50, guidance_scale = 5.0,
    max_sequence_length = 512, output_type = "video"}

local HTML_ENTITIES = {amp = "&", lt = "<", gt = ">", quot = '"', apos = "'", nbsp = "\194\160"}
local function html_unescape(s)
    return (s:gsub("&(#?[%w]+);", function(e)
        local n = e:match("^#[xX](%x+)$")
        if n then return require("nemo.tokenizers")._utf8(tonumber(n, 16)) end
        n = e:match("^#(%d+)$")
        if n then return require("nemo.tokenizers")._utf8(tonumber(n)) end
        return HTML_ENTITIES[e] or ("&" .. e .. ";")
    end))
end

-- WanPipeline's prompt_clean: html.unescape twice, strip, runs of white space to one space
-- (ftfy.fix_text, which repairs mis-decoded text, is not applied: give clean UTF-8).
function M.wan_prompt_clean(text)
    text = html_unescape(html_unescape(text))
    return (text:gsub("%s+", " "):gsub("^ ", ""):gsub(" $", ""))
end

-- WanPipeline._get_t5_prompt_embeds: {prompt, tokenizer, text_encoder, max_sequence_length = 512}
-- -> [B, max_sequence_length, D] (the text encoder's dtype): each prompt cleaned, tokenized with
-- padding to max_sequence_length and its attention mask, encoded WITH the mask, its real tokens
-- kept and the rest set to zeros.
function M.wan_encode_prompt(o)
    local prompt = o.prompt
    if type(prompt) == "string" then prompt = {prompt} end
    if type(prompt) ~= "table" or #prompt == 0 then error("sampling.wan: prompt must be a string or a list of strings", 2) end
    for _, k in ipairs{"tokenizer", "text_encoder"} do
        if o[k] == nil then
            error(string.format("sampling.wan: %s is required to encode prompts (load the pipeline with its text encoder " ..
                "and tokenizer, or pass prompt_embeds)", k), 2)
        end
    end
    local msl = o.max_sequence_length or 512
    local clean = {}
    for i, p in ipairs(prompt) do clean[i] = M.wan_prompt_clean(p) end
    return autograd.no_grad(function()
        local dt, dev = module_dtype_device(o.text_encoder)
        local t = o.tokenizer(clean, {padding = "max_length", max_length = msl, truncation = true})
        local e = o.text_encoder{input_ids = t.input_ids:to{device = dev}, attention_mask = t.attention_mask:to{device = dev}}
        local h = (e.last_hidden_state or e[1]):to{dtype = dt}
        local keep = t.attention_mask:to{dtype = dt, device = dev}:unsqueeze(2)   -- 1 on real tokens (mask = prefix)
        return h * keep, t.input_ids
    end)
end

-- The image of WanImageToVideoPipeline's video_processor.preprocess: a tensor (1 or B, 3,
-- height, width) in [0, 1] (diffusers' tensor convention), or a PNG / JPEG path resized to width
-- x height with PIL's Lanczos and divided by 255 -> 2 x - 1, float32 on device.
local function wan_image_pixels(img, B, height, width, device, werr)
    local x
    if type(img) == "string" then
        local encode = require "nemo.data.encode"
        local ok, rgb, w, h = pcall(encode.read_rgb, img)
        if not ok then werr("image: " .. tostring(rgb)) end
        if w ~= width or h ~= height then rgb = encode.resize(rgb, w, h, width, height) end
        x = encode.to_tensor(rgb, width, height, "0_1"):to{device = device}
    elseif is_tensor(img) then
        if img:dim() ~= 4 or img.shape[2] ~= 3 or img.shape[3] ~= height or img.shape[4] ~= width or
            (img.shape[1] ~= 1 and img.shape[1] ~= B) then
            werr(string.format("image must be (1 or %d, 3, %d, %d) in [0, 1] (height x width), got %s", B, height, width,
                shape_str(img.shape)))
        end
        x = img:detach():to{dtype = "float32", device = device}
    else
        werr("image must be a tensor (1 or B, 3, H, W) in [0, 1] or a PNG / JPEG path, got " .. type(img))
    end
    return x * 2 - 1
end

-- the VAE's latents_mean and 1 / latents_std as (1, zc, 1, 1, 1) tensors of dtype on device, as
-- WanPipeline / WanImageToVideoPipeline build them
local function wan_latent_stats(vae, zc, dtype, device)
    local vc = vae.config
    local mean = Tensor.tensor(vc.latents_mean, {dtype = dtype, device = device}):view(1, zc, 1, 1, 1)
    local inv_std = (Tensor.tensor(vc.latents_std, {dtype = dtype, device = device}) ^ -1):view(1, zc, 1, 1, 1)
    return mean, inv_std
end

-- the latent normalisation of WanPipeline / WanImageToVideoPipeline: (z - latents_mean) / latents_std
local function wan_normalize(lc, vae, device)
    local mean, inv_std = wan_latent_stats(vae, lc.shape[2], "float32", device)
    return (lc - mean) * inv_std
end

-- the VAE's posterior mode (argmax) of a video (1, 3, F, H, W) in [-1, 1], float32, repeated to B
local function wan_encode_mode(vae, video, B, device)
    local vdt = type(vae.dtype) == "function" and vae:dtype() or "float32"
    local vdev = device
    for _, p in vae:named_parameters() do vdev = p.device; break end
    local lc = vae:encode(video:to{dtype = vdt, device = vdev}).latent_dist:mode():to{dtype = "float32", device = device}
    if lc.shape[1] ~= B then lc = lc:expand(B, lc.shape[2], lc.shape[3], lc.shape[4], lc.shape[5]):contiguous() end
    return lc
end

-- TI2V (expand_timesteps): the image as one frame through the VAE -> the posterior's mode
-- (argmax) -> float32 (z - latents_mean) / latents_std, repeated to the batch: (B, z_dim, 1, h, w).
local function wan_image_latent(img, vae, B, height, width, device, werr)
    local x = wan_image_pixels(img, B, height, width, device, werr)
    return wan_normalize(wan_encode_mode(vae, x:unsqueeze(2), B, device), vae, device)
end

-- WanImageToVideoPipeline without expand_timesteps (Wan 2.1 I2V / FLF2V, Wan 2.2 I2V-A14B): the
-- condition channels (B, 4 + z, F', h, w): the mask (a frame of the video that is given is 1:
-- frame 0, and the last with last_image; frame 0 stands for the first 4 latent-frame slots) then
-- the normalised latent of the video [image, zeros..., (last_image)].
local function wan_i2v_condition(o, vae, B, height, width, nf, vsf_t, device, werr)
    local first = wan_image_pixels(o.image, 1, height, width, device, werr)
    local last = o.last_image ~= nil and wan_image_pixels(o.last_image, 1, height, width, device, werr) or nil
    if first.shape[1] ~= 1 or (last and last.shape[1] ~= 1) then
        werr("image (and last_image) must be one image here (1, 3, H, W): the condition is shared by the batch")
    end
    local parts = {first:unsqueeze(2)}
    local nzero = nf - 1 - (last and 1 or 0)
    if nzero > 0 then parts[#parts + 1] = Tensor.zeros({1, 3, nzero, height, width}, {device = device}) end
    if last then parts[#parts + 1] = last:unsqueeze(2) end
    local video = #parts == 1 and parts[1] or F.cat(parts, 2)
    local lc = wan_normalize(wan_encode_mode(vae, video, B, device), vae, device)
    -- mask: the F frames' 0/1 with frame 0 repeated vsf_t times, regrouped as (vsf_t, F')
    local seq = {}
    for _ = 1, vsf_t do seq[#seq + 1] = 1 end
    for f = 1, nf - 1 do seq[#seq + 1] = (last and f == nf - 1) and 1 or 0 end
    local nl = #seq / vsf_t
    local rows = {}
    for k = 1, vsf_t do
        rows[k] = {}
        for f = 1, nl do rows[k][f] = seq[(f - 1) * vsf_t + k] end
    end
    local h, w = lc.shape[4], lc.shape[5]
    local mask = Tensor.tensor(rows, {dtype = "float32", device = device}):view(1, vsf_t, nl, 1, 1)
        :expand(B, vsf_t, nl, h, w)
    return F.cat({mask, lc}, 1)
end

-- Wan 2.1 I2V's image tokens: the CLIP image encoder's penultimate hidden states of the image
-- (and last_image), tiled over the batch as torch's .repeat(B, 1, 1).
local function wan_image_embeds(o, B, tdt, device, werr)
    local ie, ip = o.image_encoder, o.image_processor
    if type(ie) ~= "table" or type(ip) ~= "table" or type(ip.preprocess) ~= "function" then
        werr("this image-to-video transformer (image_dim set) needs image_encoder (a CLIPVisionModel) and " ..
            "image_processor (a CLIPImageProcessor): load the pipeline with them or pass them")
    end
    local imgs = {o.image}
    if o.last_image ~= nil then imgs[2] = o.last_image end
    local px = {}
    for i, im in ipairs(imgs) do
        if type(im) ~= "string" and not (type(im) == "table" and im.pixels) then
            werr("with an image encoder, image (and last_image) must be a PNG / JPEG path (the CLIP processor reads " ..
                "8-bit pixels), got " .. (is_tensor(im) and "a tensor" or type(im)))
        end
        px[i] = ip:preprocess(im).pixel_values
    end
    local pv = #px == 1 and px[1] or F.cat(px, 0)
    local out = ie{pixel_values = pv:to{dtype = type(ie.dtype) == "function" and ie:dtype() or "float32"},
        output_hidden_states = true}
    local e = out.hidden_states[#out.hidden_states - 1]      -- hidden_states[-2]
    local n, I, Dm = e.shape[1], e.shape[2], e.shape[3]
    if B > 1 then e = e:unsqueeze(0):expand(B, n, I, Dm):reshape(B * n, I, Dm) end
    return e:to{dtype = tdt, device = device}
end

-- latents with frame 0 replaced by cond: (1 - mask) * cond + mask * latents for a 0/1 mask that
-- is 0 on frame 0 only (WanImageToVideoPipeline's first_frame_mask), the same values.
local function with_first_frame(latents, cond)
    local nt = latents.shape[3]
    if nt == 1 then return cond:clone() end
    return F.cat({cond, latents:narrow(2, 1, nt - 1)}, 2)
end

local function run_wan(o)
    o = with_pipe(o, M.WAN_OPTIONS, {"transformer", "transformer_2", "scheduler", "vae", "tokenizer", "text_encoder",
        "image_encoder", "image_processor"}, "sampling.wan", 4)
    local function werr(msg) error("sampling.wan: " .. msg, 4) end
    local tr, sc, vae, tok, te = o.transformer, o.scheduler, o.vae, o.tokenizer, o.text_encoder
    if type(tr) ~= "table" or type(tr.config) ~= "table" or tr.config.in_channels == nil then
        werr("transformer is required (a WanTransformer3DModel)")
    end
    -- Wan 2.2: the pipeline's boundary_ratio / expand_timesteps (model_index.json), or given
    local pcfg = (o.pipe and type(o.pipe.config) == "table") and o.pipe.config or {}
    local boundary = o.boundary_ratio
    if boundary == nil then boundary = pcfg.boundary_ratio end
    if is_null(boundary) then boundary = nil end
    local tr2 = o.transformer_2
    if boundary ~= nil then
        if type(boundary) ~= "number" or not (boundary > 0 and boundary <= 1) then
            werr("boundary_ratio must be a number in (0, 1], got " .. tostring(boundary))
        end
        if type(tr2) ~= "table" or type(tr2.config) ~= "table" then
            werr(string.format("boundary_ratio %g needs transformer_2 (Wan 2.2's low-noise transformer): load the " ..
                "pipeline with it or pass transformer_2 =", boundary))
        end
    end
    if o.guidance_scale_2 ~= nil and boundary == nil then
        werr("guidance_scale_2 is only used with boundary_ratio (Wan 2.2's two transformers), as in diffusers")
    end
    local expand = o.expand_timesteps
    if expand == nil then expand = pcfg.expand_timesteps end
    if is_null(expand) then expand = false end
    if type(expand) ~= "boolean" then werr("expand_timesteps must be true or false, got " .. tostring(expand)) end
    if type(sc) ~= "table" or type(sc.set_timesteps) ~= "function" or type(sc.step) ~= "function" then
        werr("scheduler is required (a UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler)")
    end
    local D = M.WAN_DEFAULTS
    local output_type = o.output_type or D.output_type
    if output_type ~= "latent" and output_type ~= "video" then werr("output_type must be \"latent\" or \"video\", got " .. tostring(output_type)) end
    if output_type == "video" and (type(vae) ~= "table" or type(vae.decode) ~= "function") then
        werr("output_type \"video\" needs a vae (an AutoencoderKLWan), or output_type = \"latent\"")
    end
    local height, width, nf = o.height or D.height, o.width or D.width, o.num_frames or D.num_frames
    for k, v in pairs{height = height, width = width, num_frames = nf} do
        if not posint(v) then werr(k .. " must be a positive integer, got " .. tostring(v)) end
    end
    -- the VAE's compression (WanPipeline: vae.config.scale_factor_spatial / _temporal, else 8 and 4;
    -- 16 for Wan 2.2's patchifying VAE) times the transformer's patch
    local vcfg = type(vae) == "table" and type(vae.config) == "table" and vae.config or {}
    local vsf_s = type(vcfg.scale_factor_spatial) == "number" and vcfg.scale_factor_spatial or 8
    local vsf_t = type(vcfg.scale_factor_temporal) == "number" and vcfg.scale_factor_temporal or 4
    local tp = type(tr.config.patch_size) == "table" and tr.config.patch_size or {1, 2, 2}
    local hm, wm = vsf_s * tp[2], vsf_s * tp[3]
    if height % hm ~= 0 or width % wm ~= 0 then
        werr(string.format("height and width must be multiples of %d and %d (the VAE's %d x the transformer's patch), " ..
            "got %d x %d", hm, wm, vsf_s, height, width))
    end
    if (nf - 1) % vsf_t ~= 0 then
        werr(string.format("num_frames must be %dk + 1 (1, %d, %d, ...), got %d", vsf_t, vsf_t + 1, 2 * vsf_t + 1, nf))
    end
    local nsteps = o.num_inference_steps or D.num_inference_steps
    if not posint(nsteps) then werr("num_inference_steps must be a positive integer, got " .. tostring(nsteps)) end
    local gs = o.guidance_scale == nil and D.guidance_scale or o.guidance_scale
    if type(gs) ~= "number" or gs ~= gs then werr("guidance_scale must be a number, got " .. tostring(gs)) end
    local cfg = gs > 1
    local gs2 = o.guidance_scale_2 == nil and gs or o.guidance_scale_2
    if type(gs2) ~= "number" or gs2 ~= gs2 then werr("guidance_scale_2 must be a number, got " .. tostring(gs2)) end
    local msl = o.max_sequence_length or D.max_sequence_length
    if not posint(msl) then werr("max_sequence_length must be a positive integer, got " .. tostring(msl)) end

    -- ---- prompts ----
    local pe, npe = o.prompt_embeds, o.negative_prompt_embeds
    if o.prompt ~= nil then
        if pe ~= nil then werr("give prompt or prompt_embeds, not both") end
        pe = M.wan_encode_prompt{prompt = o.prompt, tokenizer = tok, text_encoder = te, max_sequence_length = msl}
    end
    if not is_tensor(pe) or pe.ndim ~= 3 then werr("prompt (with a tokenizer and text encoder) or prompt_embeds [B, L, D] is required") end
    local B = pe.shape[1]
    if cfg and npe == nil then   -- WanPipeline: negative_prompt defaults to ""
        local neg = o.negative_prompt or ""
        if type(neg) == "string" then
            local t = {}
            for i = 1, B do t[i] = neg end
            neg = t
        end
        if #neg ~= B then werr(string.format("negative_prompt has %d prompts, prompt %d", #neg, B)) end
        npe = M.wan_encode_prompt{prompt = neg, tokenizer = tok, text_encoder = te, max_sequence_length = msl}
    end
    local tdt = type(tr.dtype) == "function" and tr:dtype() or pe.dtype
    local device = pe.device
    for _, p in tr:named_parameters() do device = p.device; break end
    pe = pe:to{dtype = tdt, device = device}
    if npe ~= nil then npe = npe:to{dtype = tdt, device = device} end

    -- ---- latents ----
    local C = tr.config.in_channels
    -- image-to-video without expand_timesteps: the transformer reads [latents; mask; condition]
    local i2v = o.image ~= nil and not expand
    if not is_null(tr.config.image_dim) and o.image == nil then
        werr("this transformer is image-to-video (image_dim set): give image = (the first frame)")
    end
    if i2v then
        if type(vae) ~= "table" or type(vae.encode) ~= "function" or type(vae.config) ~= "table" then
            werr("image = needs a vae to encode the image")
        end
        C = vae.config.z_dim
        if tr.config.in_channels ~= 2 * C + vsf_t then
            werr(string.format("image = (image-to-video) needs a transformer with in_channels = 2 x the VAE's z_dim + %d " ..
                "(latents, mask, condition) = %d, got %d (a text-to-video model?)", vsf_t, 2 * C + vsf_t,
                tr.config.in_channels))
        end
    elseif o.last_image ~= nil then
        werr("last_image needs image (first and last frames) on an image-to-video model without expand_timesteps")
    end
    local shape = {B, C, (nf - 1) / vsf_t + 1, height / vsf_s, width / vsf_s}
    local latents
    if o.latents ~= nil then
        local l = o.latents
        if not is_tensor(l) or shape_str(l.shape) ~= shape_str(shape) then
            werr(string.format("latents must be %s for %d frames of %d x %d, got %s", shape_str(shape), nf, height, width,
                is_tensor(l) and shape_str(l.shape) or type(l)))
        end
        latents = l:detach():to{dtype = "float32", device = device}
    else
        latents = Tensor.randn(shape, {dtype = "float32", device = device, generator = o.generator})
    end

    -- ---- the image (Wan 2.2 TI2V: WanImageToVideoPipeline with expand_timesteps) ----
    local cond, i2v_cond, image_embeds
    local with_image = not is_null(tr.config.image_dim)
    if i2v then
        i2v_cond = wan_i2v_condition(o, vae, B, height, width, nf, vsf_t, device, werr)
        if with_image then image_embeds = wan_image_embeds(o, B, tdt, device, werr) end
    elseif o.image ~= nil then
        if type(vae) ~= "table" or type(vae.encode) ~= "function" then werr("image = needs a vae to encode the image") end
        cond = wan_image_latent(o.image, vae, B, height, width, device, werr)
        if cond.shape[2] ~= C or cond.shape[4] ~= shape[4] or cond.shape[5] ~= shape[5] then
            werr(string.format("the image's latent %s does not fit the latents %s (the VAE's z_dim must equal the " ..
                "transformer's in_channels)", shape_str(cond.shape), shape_str(shape)))
        end
    end

    -- ---- the loop ----
    sc:set_timesteps(nsteps)
    if type(sc.set_begin_index) == "function" then sc:set_begin_index(0) end
    local ts = sc.timesteps:detach():to{device = "cpu"}:double():contiguous():reshape{-1}:tolist()
    local boundary_t = boundary and boundary * ((sc.config and sc.config.num_train_timesteps) or 1000)
    -- expand_timesteps (Wan 2.2 TI2V): one timestep per token of a (1, 2, 2) patching, [B, F' * h/2 * w/2]
    -- (with an image: 0 on frame 0's tokens, which hold the image's latent)
    local per_frame = math.ceil(shape[4] / 2) * math.ceil(shape[5] / 2)
    local tshape = expand and {B, shape[3] * per_frame} or {B}
    for i, t in ipairs(ts) do
        local model, scale = tr, gs       -- Wan 2.1, or Wan 2.2's high-noise stage
        if boundary_t and t < boundary_t then model, scale = tr2, gs2 end
        local x
        if i2v_cond then
            x = F.cat({latents, i2v_cond}, 1):to{dtype = tdt}
        else
            x = (cond and with_first_frame(latents, cond) or latents):to{dtype = tdt}
        end
        local timestep = Tensor.full(tshape, t, {dtype = "float32", device = device})
        if cond then timestep:narrow(1, 0, per_frame):fill_(0) end
        local function pred(emb)
            local y = model{hidden_states = x, timestep = timestep, encoder_hidden_states = emb,
                encoder_hidden_states_image = image_embeds}
            if type(y) == "table" and not is_tensor(y) then y = y.sample or y[1] end
            return y
        end
        local noise_pred = pred(pe)
        if cfg then
            local un = pred(npe)
            noise_pred = un + (noise_pred - un) * scale
        end
        local step = sc:step(noise_pred, sc.timesteps[i - 1], latents)
        if type(step) == "table" and not is_tensor(step) then step = step.prev_sample or step[1] end
        latents = step
        if o.callback then o.callback(i - 1, t, latents) end
    end
    if cond then latents = with_first_frame(latents, cond) end
    local out = {latents = latents, timesteps = sc.timesteps, prompt_embeds = pe, negative_prompt_embeds = npe}
    if output_type == "latent" then return out end
    -- ---- decode: latents / (1 / std) + mean per channel ----
    local vc = vae.config
    local vdt = type(vae.dtype) == "function" and vae:dtype() or "float32"
    local z = latents:to{dtype = vdt}
    local zc = vc.z_dim or C
    local mean, inv_std = wan_latent_stats(vae, zc, vdt, device)
    local dec = vae:decode(z / inv_std + mean)
    out.video = (type(dec) == "table" and not is_tensor(dec)) and (dec.sample or dec[1]) or dec
    return out
end

-- wan{pipe =, prompt =, negative_prompt = "", height = 480, width = 832, num_frames = 81,
-- num_inference_steps = 50, guidance_scale = 5.0, max_sequence_length = 512, latents = |
-- generator =, output_type = "video" | "latent", callback = fn(i, t, latents)} -> {latents =
-- [B, C, F', H/r, W/r] (r: the VAE's scale_factor_spatial, 8; 16 for Wan 2.2's VAE), video = [B,
-- 3, F, H, W] in [-1, 1], timesteps, prompt_embeds,
-- negative_prompt_embeds}: WanPipeline.__call__ (Wan 2.1, one transformer): prompts cleaned and
-- encoded with the text encoder's mask (wan_encode_prompt), float32 latents, the scheduler's
-- timesteps (UniPC for Wan), classifier-free guidance uncond + guidance_scale * (cond - uncond)
-- when guidance_scale > 1, then the VAE decode of latents * latents_std + latents_mean. Any
-- component may be given instead of pipe's. Under nemo.no_grad.
-- Wan 2.2 (from the pipeline's model_index.json, or given): boundary_ratio = r runs timesteps
-- >= r * num_train_timesteps on transformer (guidance_scale) and the rest on transformer_2
-- (guidance_scale_2, default guidance_scale); expand_timesteps = true gives the transformer one
-- timestep per token ([B, F' * ceil(h/2) * ceil(w/2)], TI2V's layout). image = (with
-- expand_timesteps: Wan 2.2 TI2V's image-to-video, WanImageToVideoPipeline): a tensor (1 or B, 3,
-- H, W) in [0, 1] or a PNG / JPEG path (resized to width x height, PIL's Lanczos); its VAE latent
-- (posterior mode, normalised) is frame 0 of the model's input at every step, with timestep 0 on
-- frame 0's tokens, and of the final latents. Without expand_timesteps (Wan 2.1 I2V / FLF2V,
-- Wan 2.2 I2V-A14B: WanImageToVideoPipeline's other mode) the transformer reads [latents; mask;
-- condition] (the condition: the video [image, zeros..., last_image] through the VAE) and, when
-- it has image_dim, the image_encoder's penultimate tokens of image_processor(image) (and
-- last_image) in its cross-attentions: image must then be a path; image_encoder /
-- image_processor come from the pipeline or the options.
function M.wan(opts)
    if type(opts) ~= "table" or is_tensor(opts) then error("sampling.wan: expected a table of options", 2) end
    return autograd.no_grad(run_wan, opts)
end

-- video_frames(video [B, 3, F, H, W] in [-1, 1], b = 1) -> a list of F [1, H, W, 3] uint8-valued
-- images (sampling.to_uint8's rounding) of sample b, for nemo.image.save / write_apng.
function M.video_frames(video, b)
    if not is_tensor(video) or video.ndim ~= 5 then
        error("sampling.video_frames: expected a video [B, 3, F, H, W], got " .. (is_tensor(video) and shape_str(video.shape) or type(video)), 2)
    end
    b = b or 1
    local frames = {}
    for f = 0, video.shape[3] - 1 do
        local im = video:narrow(0, b - 1, 1):select(2, f)   -- [1, 3, H, W]
        frames[#frames + 1] = (M.to_uint8(im:contiguous()))
    end
    return frames
end

-- postprocess(image): VaeImageProcessor.denormalize, (image * 0.5 + 0.5):clamp(0, 1): the
-- output_type "pt" image in [0, 1].
function M.postprocess(image)
    if not is_tensor(image) then error("sampling.postprocess: expected an image tensor, got " .. type(image), 2) end
    return autograd.no_grad(function() return (image * 0.5 + 0.5):clamp(0, 1) end)
end

-- x rounded to the nearest integer, ties to even (numpy's and Python's round)
local function round_half_even(x)
    local f = math.floor(x)
    local d = x - f
    if d > 0.5 then return f + 1 elseif d < 0.5 then return f end
    return (f % 2 == 0) and f or f + 1
end
M.round_half_even = round_half_even

-- to_uint8(image [B, C, H, W] in [-1, 1]) -> an int32 tensor [B, H, W, C] of 0..255 (nemo has no
-- uint8 dtype) and the same bytes as a Lua string (B*H*W*C bytes, NHWC): diffusers'
-- postprocess to PIL: denormalize, permute to NHWC, (x * 255).round() (numpy rounds half to
-- even), astype uint8.
function M.to_uint8(image)
    if not is_tensor(image) or image.ndim ~= 4 then
        error("sampling.to_uint8: expected an image tensor [B, C, H, W], got " ..
            (is_tensor(image) and shape_str(image.shape) or type(image)), 2)
    end
    local vals = autograd.no_grad(function()
        local x = M.postprocess(image:detach():to{device = "cpu"}:float()):permute{0, 2, 3, 1}:contiguous()
        return (x * 255):double():reshape{-1}:tolist()
    end)
    local ints, bytes = {}, {}
    for i, v in ipairs(vals) do
        local r = round_half_even(v)
        if r < 0 then r = 0 elseif r > 255 then r = 255 end
        ints[i] = r
        bytes[i] = string.char(r)
    end
    local s = image.shape
    local t = Tensor.tensor(ints, {dtype = "int32"}):reshape{s[1], s[3], s[4], s[2]}
    return t, table.concat(bytes)
end

-- ==== pipelines for sampling (tools/flux_sample.lua, tools/wan_sample.lua, nemo.generate) ====

-- open_pipeline(model, {dtype=, device="auto"}): the pipeline at model (a folder or a hub id)
-- for sampling: device "auto" is nemo.pipeline._choose_device(), gradient checkpointing off.
function M.open_pipeline(model, o)
    local nemo = require "nemo"
    local device = o.device or "auto"
    if device == "auto" then device = nemo.pipeline._choose_device() end
    return nemo.NeMoAutoDiffusionPipeline.from_pretrained(model, {torch_dtype = o.dtype, device = device,
        enable_gradient_checkpointing = false})
end

-- ready_pipeline(pipe, {lora=, lora_scale=1, log=}): applies the LoRA adapter folder lora (if
-- given) to pipe.transformer, saying so through log(msg), then puts transformer and
-- transformer_2 in eval mode.
function M.ready_pipeline(pipe, o)
    local c = pipe.components
    if o.lora then
        local scale = o.lora_scale or 1.0
        require("nemo.peft").load_adapter(c.transformer, o.lora, {scale = scale})
        o.log(string.format("applied the LoRA adapter %s (scale %g)", o.lora, scale))
    end
    for _, k in ipairs{"transformer", "transformer_2"} do if c[k] then c[k]:eval() end end
    return pipe
end

return M
