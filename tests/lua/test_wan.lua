-- tests/lua/test_wan.lua: WanTransformer3DModel against diffusers' golden cases
-- (wan_tiny, found by tests/lua/golden.lua: forward + mse + backward in float32 vs
-- case.safetensors and float64 vs case_f64exact.safetensors; flow_wan_tiny: Automodel's whole
-- flow-matching step replayed from its stored draws), then other configurations (patch (2,2,2), more frames, batch > 1,
-- cross_attn_norm false, out_channels != in_channels, TI2V per-token timesteps) checked float32
-- against float64, gradient checkpointing (bitwise gradients, lower peak), _keep_in_fp32_modules
-- under torch_dtype bfloat16, config errors, save/load round trips, the WanPipeline folder through
-- NeMoAutoDiffusionPipeline.from_pretrained / from_config, and the shipped 1.3B / 14B configs'
-- parameter counts (arithmetic: nothing that large is allocated). Golden parts FAIL without the
-- cases.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local F = nemo.F
local models = require "nemo.models"
local wan = require "nemo.models.wan"
local json = require "nemo.json"
local fs = require "nemo.fs"
local pipeline = require "nemo.pipeline"
local FM = require "nemo.flow_matching"
local Wan = wan.WanTransformer3DModel
local golden = require "golden"

-- ==== helpers ====

local bitwise = T.same_values

local function shape(t) return nemo.Tensor.shape_str(t.shape) end

local tmpdir = T.tmpdir

local function is_embedder_w1(name) return name == "condition_embedder.time_embedder.linear_1.weight" end

-- every parameter gradient against a reference file's grad.<name>: rtol per parameter (5e-5,
-- 2e-3 for the time embedder's linear_1 in float32), atol; one test line with the worst
local function check_grads(model, ref, rtol, rtol_w1, atol, label)
    local worst, worst_name, bad, n = 0, "", {}, 0
    for name, p in model:named_parameters() do
        n = n + 1
        local g = ref["grad." .. name]
        if g == nil or p.grad == nil then
            bad[#bad + 1] = name .. (g == nil and " (no golden grad)" or " (no gradient)")
        else
            local rt = is_embedder_w1(name) and rtol_w1 or rtol
            local d, r = T.maxdiff(p.grad, g)
            if not (d <= rt * r + atol) then bad[#bad + 1] = string.format("%s: max_abs %.3g > %.3g", name, d, rt * r + atol) end
            if r > 0 and d / r > worst and not is_embedder_w1(name) then worst, worst_name = d / r, name end
        end
    end
    T.ok(#bad == 0 and n > 0, string.format("%s: all %d parameter gradients within %g*max|ref| + %g (time embedder " ..
        "linear_1.weight %g); worst other rel %.3g (%s)", label, n, rtol, atol, rtol_w1, worst, worst_name),
        table.concat(bad, "\n"))
end

-- ==== golden: wan_tiny ====

local wan_dir, wan_why = golden.case("wan_tiny", "config.json")
local DIFF_INPUTS = {"hidden_states", "encoder_hidden_states"}

local function inputs_of(case, dtype)
    local args = {}
    for k, v in pairs(case) do
        local name = k:match("^input%.(.+)$")
        if name then args[name] = v:to{dtype = dtype, copy = true} end
    end
    for _, k in ipairs(DIFF_INPUTS) do args[k]:requires_grad_(true) end
    return args
end

if wan_dir then
    local dir = wan_dir
    local model = Wan.from_pretrained(dir)
    local meta = json.read_file(dir .. "/case.json")
    local sd, keys = model:state_dict()
    local order_ok = #keys == #meta.state_dict_keys
    for i, k in ipairs(meta.state_dict_keys) do order_ok = order_ok and keys[i] == k end
    T.ok(order_ok, string.format("wan_tiny: %d parameter names in diffusers' state_dict order", #keys))
    local wf = nemo.load_file(dir .. "/diffusion_pytorch_model.safetensors")
    local shapes_ok = true
    for k, t in pairs(wf) do
        if sd[k] == nil or shape(sd[k]) ~= shape(t) then shapes_ok = false; T.diag("mismatch: " .. k) end
    end
    T.ok(shapes_ok, "wan_tiny: parameter names and shapes equal the golden weight file's")
    T.is(model:num_parameters(), 25592, "wan_tiny: 25,592 parameters")
    T.is(select(1, wan.count_parameters(model.config)), 25592, "count_parameters(config) agrees")

    -- float32
    local case = nemo.load_file(dir .. "/case.safetensors")
    local args = inputs_of(case, "float32")
    local out = model(args)
    local loss = F.mse_loss(out, case.target)
    loss:backward()
    T.is(shape(out), "(1, 4, 2, 16, 16)", "wan_tiny: output (B, C_out, F, H, W)")
    T.close(out, case.output, 2e-5, 1e-7, "wan_tiny f32 output")
    local lref = case.loss:reshape{-1}:tolist()[1]
    T.ok(math.abs(loss:item() - lref) <= 5e-6 * math.abs(lref),
        string.format("wan_tiny f32 loss %.9g vs %.9g: rel <= 5e-6", loss:item(), lref))
    check_grads(model, case, 5e-5, 2e-3, 1e-7, "wan_tiny f32")
    for _, k in ipairs(DIFF_INPUTS) do
        T.close(args[k].grad, case["grad_input." .. k], 2e-5, 1e-7, "wan_tiny f32 grad_input." .. k)
    end

    -- float64 against the fully float64 reference
    model:zero_grad()
    model:to{dtype = "float64"}
    local c64 = nemo.load_file(dir .. "/case_f64exact.safetensors")
    local a64 = inputs_of(c64, "float64")
    local out64 = model(a64)
    local loss64 = F.mse_loss(out64, c64.target)
    loss64:backward()
    T.is(out64.dtype, "float64", "wan_tiny f64: output stays float64")
    T.close(out64, c64.output, 1e-9, 0, "wan_tiny f64 output")
    local l64 = c64.loss:reshape{-1}:tolist()[1]
    T.ok(math.abs(loss64:item() - l64) <= 1e-9 * math.abs(l64),
        string.format("wan_tiny f64 loss rel %.3g <= 1e-9", math.abs(loss64:item() - l64) / math.abs(l64)))
    check_grads(model, c64, 1e-9, 1e-8, 0, "wan_tiny f64")
    for _, k in ipairs(DIFF_INPUTS) do
        T.close(a64[k].grad, c64["grad_input." .. k], 1e-9, 0, "wan_tiny f64 grad_input." .. k)
    end
else
    T.ok(false, "wan_tiny golden comparisons: " .. wan_why)
end

-- ==== golden: flow_wan_tiny (Automodel's flow-matching step with the SimpleAdapter) ====

local WAN_FM = {adapter_type = "simple", timestep_sampling = "uniform", flow_shift = 3.0, mix_uniform_ratio = 0.1,
                use_loss_weighting = true, loss_weighting_scheme = "linear"}

local flow_dir, flow_why = golden.case("flow_wan_tiny", "config.json")
if flow_dir then
    local dir = flow_dir
    for _, v in ipairs {{"step.safetensors", "float32", 1e-5, 2e-5, 5e-5, 2e-3, 1e-7},
                        {"step_f64exact.safetensors", "float64", 1e-9, 1e-9, 1e-9, 1e-8, 0}} do
        local file, dt, lrel, prtol, grtol, w1tol, atol = v[1], v[2], v[3], v[4], v[5], v[6], v[7]
        local st = nemo.load_file(dir .. "/" .. file)
        local model = Wan.from_pretrained(dir)
        if dt == "float64" then model:to{dtype = "float64"} end
        local fm = FM.FlowMatching(WAN_FM)
        local batch = {data_type = "video", video_latents = st["batch.video_latents"],
                       text_embeddings = st["batch.text_embeddings"]}
        local loss, out = fm:step(model, batch, {compute_dtype = dt,
            draws = {uniform = st["rng.uniform"], noise = st["rng.noise"]}})
        local label = "flow_wan_tiny " .. dt
        local lv, lr = loss:item(), st.loss:reshape{-1}:tolist()[1]
        T.ok(math.abs(lv - lr) <= lrel * math.abs(lr), string.format("%s: loss %.10g vs %.10g (rel %.2g <= %g)", label,
            lv, lr, math.abs(lv - lr) / math.abs(lr), lrel))
        T.close(out.model_input.timestep, st["model_input.timestep"], 0, 0, label .. ": model timestep (raw t, no /1000)")
        T.close(out.pred, st.model_pred, prtol, atol, label .. ": model_pred")
        loss:backward()
        check_grads(model, st, grtol, w1tol, atol, label)
        if dt == "float32" then
            -- the rest of the step: clip to max_norm 1 (coefficient 0.238 here), one AdamW step
            -- (the YAML's lr 5e-6, wd 0.01); each update is about lr, so atol 5e-7 = lr / 10
            local params, names = {}, {}
            for name, p in model:named_parameters() do params[#params + 1] = p; names[#names + 1] = name end
            local norm = nemo.optim.clip_grad_norm_(params, 1.0)
            local nref = st["optim.grad_norm"]:item()
            T.ok(math.abs(norm - nref) <= 1e-6 * nref, string.format("%s: grad norm %.9g vs %.9g (rel <= 1e-6)", label,
                norm, nref))
            nemo.optim.AdamW(params, {lr = 5e-6, weight_decay = 0.01, betas = {0.9, 0.999}, eps = 1e-8}):step()
            local worst, wname = 0, ""
            for i, p in ipairs(params) do
                local d = T.maxdiff(p, st["optim.param." .. names[i]])
                if d > worst then worst, wname = d, names[i] end
            end
            T.ok(worst <= 5e-7, string.format("%s: every parameter after clipping + one AdamW step within 5e-7 " ..
                "(lr/10); worst %.3g (%s)", label, worst, wname))
        end
    end
else
    T.ok(false, "flow_wan_tiny golden step: " .. flow_why)
end

-- ==== other configurations: float32 vs float64 of the same weights ====

local function random_inputs(cfg, B, Fr, H, W, Tt, seed)
    local g = nemo.Generator(seed)
    return {hidden_states = nemo.randn({B, cfg.in_channels, Fr, H, W}, {generator = g}),
            timestep = nemo.rand({B}, {generator = g}) * 1000,
            encoder_hidden_states = nemo.randn({B, Tt, cfg.text_dim}, {generator = g})}, g
end

local function f32_vs_f64(cfg, B, Fr, H, W, Tt, label, expect_shape)
    nemo.manual_seed(21)
    local m = Wan(cfg)
    local args, g = random_inputs(cfg, B, Fr, H, W, Tt, 22)
    local cout = cfg.out_channels or cfg.in_channels
    local target = nemo.randn({B, cout, Fr, H, W}, {generator = g})
    args.hidden_states:requires_grad_(true)
    local out = m(args)
    T.is(shape(out), expect_shape, label .. ": output shape")
    F.mse_loss(out, target):backward()
    local g32, missing = {}, {}
    for name, p in m:named_parameters() do
        if p.grad == nil then missing[#missing + 1] = name else g32[name] = p.grad end
    end
    local gi32 = args.hidden_states.grad
    T.ok(#missing == 0, label .. ": every parameter receives a gradient", table.concat(missing, ", "))
    T.is(select(1, wan.count_parameters(cfg)), m:num_parameters(), label .. ": count_parameters equals the model's")
    m:zero_grad()
    m:to{dtype = "float64"}
    local a64 = {}
    for k, v in pairs(args) do a64[k] = v:detach():double() end
    a64.hidden_states:requires_grad_(true)
    local out64 = m(a64)
    F.mse_loss(out64, target:double()):backward()
    T.close(out, out64, 1e-5, 0, label .. ": float32 output vs float64")
    local worst, wname = 0, ""
    for name, p in m:named_parameters() do
        local d, r = T.maxdiff(g32[name], p.grad)
        if r > 0 and d / r > worst and not is_embedder_w1(name) then worst, wname = d / r, name end
    end
    T.ok(worst < 1e-4, string.format("%s: float32 gradients vs float64: worst rel %.3g < 1e-4 (%s)", label, worst, wname))
    T.close(gi32, a64.hidden_states.grad, 1e-4, 0, label .. ": float32 input gradient vs float64")
    return m
end

f32_vs_f64({patch_size = {2, 2, 2}, num_attention_heads = 2, attention_head_dim = 16, in_channels = 3, out_channels = 5,
            text_dim = 10, freq_dim = 32, ffn_dim = 40, num_layers = 2, cross_attn_norm = false, rope_max_seq_len = 16},
    3, 4, 6, 10, 5, "patch (2,2,2), out 5 != in 3, batch 3, no cross-attn norm", "(3, 5, 4, 6, 10)")
f32_vs_f64({patch_size = {1, 2, 2}, num_attention_heads = 3, attention_head_dim = 8, in_channels = 4, out_channels = 4, text_dim = 6,
            freq_dim = 64, ffn_dim = 20, num_layers = 1, rope_max_seq_len = 8},
    2, 5, 4, 6, 7, "5 frames, 3 heads x 8 (rope dims 4,2,2), batch 2, odd text length", "(2, 4, 5, 4, 6)")

do  -- TI2V: a (B, L) timestep holding each sample's t for every token equals the (B) timestep
    local cfg = {num_attention_heads = 2, attention_head_dim = 8, in_channels = 4, text_dim = 6, freq_dim = 32,
                 ffn_dim = 16, num_layers = 2, rope_max_seq_len = 8}
    nemo.manual_seed(5)
    local m = Wan(cfg)
    local args = random_inputs(cfg, 2, 2, 4, 4, 3, 6)
    local ref = nemo.no_grad(function() return m(args) end)
    local L = 2 * 2 * 2
    local a2 = {hidden_states = args.hidden_states, encoder_hidden_states = args.encoder_hidden_states,
                timestep = args.timestep:unsqueeze(1):expand(2, L):contiguous()}
    local out = nemo.no_grad(function() return m(a2) end)
    T.close(out, ref, 1e-6, 0, "TI2V: per-token timestep (B, L) filled with t equals timestep (B)")
    local pos = nemo.no_grad(function() return m(args.hidden_states, args.timestep, args.encoder_hidden_states) end)
    T.ok(bitwise(pos, ref), "positional call model(x, t, e) equals the named call (bitwise)")
    local a3 = {hidden_states = args.hidden_states, encoder_hidden_states = args.encoder_hidden_states,
                timestep = args.timestep, attention_kwargs = {scale = 1.0}, return_dict = false}
    T.ok(bitwise(nemo.no_grad(function() return m(a3) end), ref), "attention_kwargs {scale = 1} is accepted and ignored")
    T.raises(function() return m{hidden_states = args.hidden_states, encoder_hidden_states = args.encoder_hidden_states,
        timestep = nemo.zeros(3)} end, "timestep must have shape %(2%)", "timestep of the wrong length: error")
    T.raises(function() return m{hidden_states = nemo.zeros(2, 4, 2, 4, 5), encoder_hidden_states = args.encoder_hidden_states,
        timestep = args.timestep} end, "multiples of patch_size", "W not a multiple of p_w: error")
    T.raises(function() return m{hidden_states = nemo.zeros(1, 4, 2, 4, 34), encoder_hidden_states = nemo.zeros(1, 3, 6),
        timestep = nemo.zeros(1)} end, "exceed rope_max_seq_len", "grid beyond rope_max_seq_len: error")
    T.raises(function() return m{hidden_states = args.hidden_states, encoder_hidden_states = nemo.zeros(2, 3, 7),
        timestep = args.timestep} end, "text_dim", "encoder_hidden_states of the wrong width: error")
    T.raises(function() return m{hidden_states = args.hidden_states, encoder_hidden_states = args.encoder_hidden_states,
        timestep = args.timestep, encoder_hidden_states_image = nemo.zeros(2, 1, 4)} end,
        "is given but this is a text%-to%-video model", "encoder_hidden_states_image on a text-to-video model: error")
end

-- ==== gradient checkpointing ====

do
    local cfg = {num_attention_heads = 2, attention_head_dim = 16, in_channels = 4, out_channels = 4, text_dim = 12,
                 freq_dim = 64, ffn_dim = 64, num_layers = 3, rope_max_seq_len = 16}
    nemo.manual_seed(8)
    local m = Wan(cfg)
    local args, g = random_inputs(cfg, 2, 4, 8, 8, 6, 9)
    local target = nemo.randn({2, 4, 4, 8, 8}, {generator = g})
    args.hidden_states:requires_grad_(true)
    local function run(ckpt)
        if ckpt then m:enable_gradient_checkpointing() else m:disable_gradient_checkpointing() end
        m:zero_grad()
        args.hidden_states.grad = nil
        collectgarbage(); collectgarbage()
        collectgarbage("stop")
        nemo.reset_peak_memory_stats()
        local base = nemo.memory_stats().current
        local loss = F.mse_loss(m(args), target)
        loss:backward()
        local peak = nemo.memory_stats().peak - base
        collectgarbage("restart")
        local grads = {}
        for name, p in m:named_parameters() do grads[name] = p.grad end
        return loss:item(), grads, args.hidden_states.grad, peak
    end
    local l0, g0, gi0, peak0 = run(false)
    local l1, g1, gi1, peak1 = run(true)
    T.ok(l0 == l1, "checkpointing: bitwise equal loss")
    local all, n = true, 0
    for name, gg in pairs(g0) do
        n = n + 1
        if not bitwise(gg, g1[name]) then all = false; T.diag("differs: " .. name) end
    end
    T.ok(all and n > 0, string.format("checkpointing: all %d parameter gradients bitwise equal", n))
    T.ok(bitwise(gi0, gi1), "checkpointing: input gradient bitwise equal")
    T.ok(peak1 < peak0, string.format("checkpointing lowers the peak memory of a step: %d < %d bytes", peak1, peak0))
end

-- ==== config ====

do
    -- image-to-video keys (their numbers: test_wan_configs.lua's wan_i2v / wan_flf2v)
    T.raises(function() return Wan{image_dim = 1280} end, "'image_dim' %(1280%) and 'added_kv_proj_dim' %(null%) " ..
        "must be set together", "image_dim without added_kv_proj_dim: error naming both keys")
    T.raises(function() return Wan{added_kv_proj_dim = 5120} end, "added_kv_proj_dim", "added_kv_proj_dim alone: error")
    T.raises(function() return Wan{image_dim = 1280, added_kv_proj_dim = 1024} end,
        "'added_kv_proj_dim' %(1024%) must equal the inner dim 5120", "added_kv_proj_dim other than the inner dim: error")
    T.raises(function() return Wan{pos_embed_seq_len = 514} end, "'pos_embed_seq_len' needs image_dim",
        "pos_embed_seq_len without image_dim: error")
    do
        local n = wan.count_parameters{image_dim = 1280, added_kv_proj_dim = 5120, in_channels = 36}
        T.is(n, 16394878784, "Wan2.1-I2V-14B's config: 16,394,878,784 parameters (diffusers' count, built on meta)")
    end
    T.raises(function() return Wan{num_layers = "2"} end, "config key 'num_layers' must be a non%-negative integer",
        "wrong-typed config field: error names the key")
    T.raises(function() return Wan{patch_size = {1, 2}} end, "'patch_size' must be a list of 3 positive integers",
        "patch_size not of 3 entries: error")
    T.raises(function() return Wan{cross_attn_norm = "yes"} end, "'cross_attn_norm' must be a boolean", "bool key check")
    local tiny = {num_attention_heads = 1, attention_head_dim = 6, in_channels = 2, text_dim = 4, freq_dim = 8,
                  ffn_dim = 8, num_layers = 1, rope_max_seq_len = 4}
    local m = Wan(tiny)
    local c = m.config
    T.ok(c.patch_size[1] == 1 and c.patch_size[3] == 2 and c.out_channels == 16 and c.eps == 1e-6 and
        c.qk_norm == "rms_norm_across_heads" and c.image_dim == json.null and c.cross_attn_norm == true,
        "config defaults: patch (1,2,2), out_channels 16, eps 1e-6, qk_norm, image_dim null, cross_attn_norm")
    local t2 = {}
    for k, v in pairs(tiny) do t2[k] = v end
    t2.out_channels = json.null
    T.is(Wan(t2).out_channels, 2, "out_channels null -> in_channels")
    -- qk_norm is accepted and ignored: another value builds the same tree and computes the same
    t2.out_channels, t2.qk_norm = nil, "whatever"
    nemo.manual_seed(3)
    local ma = Wan(tiny)
    nemo.manual_seed(3)
    local mb = Wan(t2)
    local args = random_inputs({in_channels = 2, text_dim = 4}, 1, 1, 2, 2, 2, 4)
    T.ok(bitwise(nemo.no_grad(function() return ma(args) end), nemo.no_grad(function() return mb(args) end)) and
        ma:num_parameters() == mb:num_parameters(), "qk_norm is accepted and ignored (same parameters, same output)")
    T.ok(ma.blocks:get(1).attn1.norm_q.weight.shape[1] == 6, "norm_q works across heads: weight [D]")
end

-- ==== files, keep_in_fp32, pipeline ====

local small_cfg = {num_attention_heads = 2, attention_head_dim = 12, in_channels = 4, out_channels = 4, text_dim = 16,
                   freq_dim = 256, ffn_dim = 32, num_layers = 2, rope_max_seq_len = 32}

do  -- save_pretrained / from_pretrained round trips, torch_dtype bfloat16
    nemo.manual_seed(31)
    local m = Wan(small_cfg)
    local args = random_inputs(small_cfg, 1, 2, 4, 4, 5, 32)
    local ref = nemo.no_grad(function() return m(args) end)
    local dir = tmpdir()
    m:save_pretrained(dir)
    local cfg = json.read_file(dir .. "/config.json")
    local same_keys = true
    if wan_dir then
        local gold = json.read_file(wan_dir .. "/config.json")
        for k in pairs(gold) do if cfg[k] == nil then same_keys = false; T.diag("missing key " .. k) end end
        for k in pairs(cfg) do if gold[k] == nil then same_keys = false; T.diag("extra key " .. k) end end
    else
        same_keys = false; T.diag("no golden wan_tiny/config.json to compare the keys with: " .. wan_why)
    end
    T.ok(same_keys and cfg._class_name == "WanTransformer3DModel" and #cfg.patch_size == 3 and
        cfg.image_dim == json.null and cfg.qk_norm == "rms_norm_across_heads",
        "config.json has diffusers' keys (those of the golden config.json), patch_size a list, nulls")
    local m2 = Wan.from_pretrained(dir)
    T.ok(bitwise(nemo.no_grad(function() return m2(args) end), ref), "save_pretrained + from_pretrained: same output (bitwise)")
    local sdir = tmpdir()
    m:save_pretrained(sdir, {max_shard_size = 8000})
    local idx = json.read_file(sdir .. "/diffusion_pytorch_model.safetensors.index.json")
    local files = {}
    for _, f in pairs(idx.weight_map) do files[f] = true end
    local nfiles = 0
    for _ in pairs(files) do nfiles = nfiles + 1 end
    T.ok(nfiles > 1 and not fs.isfile(sdir .. "/diffusion_pytorch_model.safetensors") and
        idx.metadata.total_size == m:num_parameters() * 4, string.format("sharded save: %d shards and an index", nfiles))
    T.ok(bitwise(nemo.no_grad(function() return Wan.from_pretrained(sdir)(args) end), ref),
        "sharded round trip: same output (bitwise)")
    -- torch_dtype bfloat16: _keep_in_fp32_modules stay float32
    local mb = Wan.from_pretrained(dir, {torch_dtype = "bfloat16"})
    local wrong = {}
    for name, p in mb:named_parameters() do
        local want_dt = wan.keep_in_fp32(name) and "float32" or "bfloat16"
        if p.dtype ~= want_dt then wrong[#wrong + 1] = name .. " " .. p.dtype end
    end
    T.ok(#wrong == 0 and mb.condition_embedder.time_embedder.linear_1.weight.dtype == "float32" and
        mb.blocks:get(1).scale_shift_table.dtype == "float32" and mb.blocks:get(1).norm2.weight.dtype == "float32" and
        mb.scale_shift_table.dtype == "float32" and mb.condition_embedder.time_proj.weight.dtype == "bfloat16" and
        mb.blocks:get(1).attn1.norm_q.weight.dtype == "bfloat16",
        "torch_dtype bfloat16: time_embedder, scale_shift_tables, norm2 float32; the rest bfloat16", table.concat(wrong, ", "))
    local ab = {}
    for k, v in pairs(args) do ab[k] = v:to{dtype = "bfloat16"} end
    ab.timestep = args.timestep
    local outb = nemo.no_grad(function() return mb(ab) end)
    T.is(outb.dtype, "bfloat16", "bf16 model with float32 keep modules: bf16 output")
    T.close(outb, ref, 3e-2, 0, "bf16 model output vs float32 (bf16 tolerance)")
    -- errors
    local bad = tmpdir()
    T.raises(function() return Wan.from_pretrained(bad) end, "missing config file", "from_pretrained without config.json")
    m:save_pretrained(bad)
    local sd = nemo.load_file(bad .. "/diffusion_pytorch_model.safetensors")
    local sd2 = {}
    for k, v in pairs(sd) do sd2[k] = v end
    sd2["proj_out.bias"] = nil
    sd2["blocks.0.attn2.norm_added_q.weight"] = nemo.zeros(24)     -- diffusers ignores this key
    nemo.save_file(sd2, bad .. "/diffusion_pytorch_model.safetensors", {format = "pt"})
    local ok, err = pcall(Wan.from_pretrained, bad)
    T.ok(not ok and err:find("missing keys: proj_out.bias", 1, true) and not err:find("norm_added_q", 1, true),
        "a missing key is an error naming it; norm_added_q is ignored as diffusers does", err)
    for _, d in ipairs {dir, sdir, bad} do fs.remove_tree(d) end
end

do  -- a WanPipeline folder through NeMoAutoDiffusionPipeline
    local root = tmpdir()
    nemo.manual_seed(41)
    local m = Wan(small_cfg)
    m:save_pretrained(root .. "/pipe/transformer")
    local vsrc = require("golden").case("wan_vae_tiny", "config.json")   -- a tiny AutoencoderKLWan
    fs.mkdirs(root .. "/pipe/vae")
    fs.copy_file(vsrc .. "/config.json", root .. "/pipe/vae/config.json")
    fs.copy_file(vsrc .. "/diffusion_pytorch_model.safetensors", root .. "/pipe/vae/diffusion_pytorch_model.safetensors")
    fs.mkdirs(root .. "/pipe/scheduler")   -- Wan 2.1's UniPC config
    fs.copy_file(require("golden").case("sched_unipc", "wan21_480/scheduler_config.json") .. "/wan21_480/scheduler_config.json",
        root .. "/pipe/scheduler/scheduler_config.json")
    json.write_file(root .. "/pipe/model_index.json", {
        _class_name = "WanPipeline", _diffusers_version = "0.33.0.dev0",
        tokenizer = {"transformers", "T5TokenizerFast"}, text_encoder = {"transformers", "UMT5EncoderModel"},
        vae = {"diffusers", "AutoencoderKLWan"}, scheduler = {"diffusers", "UniPCMultistepScheduler"},
        transformer = {"diffusers", "WanTransformer3DModel"}, transformer_2 = {json.null, json.null},
        boundary_ratio = json.null, expand_timesteps = false}, {indent = 2})
    local P = pipeline.NeMoAutoDiffusionPipeline
    local pipe = P.from_pretrained(root .. "/pipe", {torch_dtype = "float32", device = "cpu", load_for_training = true})
    local args = random_inputs(small_cfg, 1, 2, 4, 4, 5, 42)
    T.ok(pipe.transformer ~= nil and pipe.class_name == "WanPipeline" and pipe.transformer.gradient_checkpointing and
        bitwise(nemo.no_grad(function() return pipe.transformer(args) end), nemo.no_grad(function() return m(args) end)),
        "WanPipeline.from_pretrained: the transformer loads (same output, bitwise), checkpointing on")
    local pc = P.from_config(root .. "/pipe", {transformer_cls = "WanTransformer3DModel"}, {torch_dtype = "float32", device = "cpu"})
    T.ok(pc.class_name == "WanPipeline" and pc.transformer:num_parameters() == m:num_parameters(),
        "from_config with transformer_cls WanTransformer3DModel builds the configured model")
    pipe:save_pretrained(root .. "/saved")
    local idx = json.read_file(root .. "/saved/model_index.json")
    T.ok(idx._class_name == "WanPipeline" and idx.transformer[2] == "WanTransformer3DModel" and
        idx.vae[2] == "AutoencoderKLWan" and fs.isfile(root .. "/saved/transformer/config.json") and
        fs.isfile(root .. "/saved/vae/diffusion_pytorch_model.safetensors") and idx.scheduler[2] == "UniPCMultistepScheduler" and
        fs.isfile(root .. "/saved/scheduler/scheduler_config.json"),
        "pipeline save_pretrained writes a WanPipeline folder (the AutoencoderKLWan saved by its model, UniPC's config)")
    fs.remove_tree(root)
    -- the shipped real configs, counted without allocating
    for _, v in ipairs {{"Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 1418996800, 825},
                        {"Wan-AI/Wan2.1-T2V-14B-Diffusers", 14288491584, 1095},
                        {"Wan-AI/Wan2.2-TI2V-5B-Diffusers", 4999787712, 825},
                        {"Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", 16394878784, 1303}} do
        local cfg = pipeline._read_component_config(v[1], "transformer")
        local n, t = wan.count_parameters(cfg)
        T.ok(n == v[2] and t == v[3], string.format("shipped %s config: %d parameters in %d tensors (diffusers: %d)",
            v[1], n, t, v[2]))
    end
end

do  -- the recipes, end to end on their demo assets (a few steps; run as the user runs them)
    local root = tmpdir()
    local exe = fs.isfile("./nemo-lua") and "./nemo-lua" or nil
    for _, name in ipairs {"wan_finetune", "wan_pretrain"} do
        if exe == nil then T.skip(name .. " recipe", "no ./nemo-lua launcher"); break end
        local run = root .. "/" .. name
        local cmd = string.format("XDG_CACHE_HOME='%s' %s recipes/%s.lua --demo.samples 16 --step_scheduler.max_steps 4 " ..
            "--step_scheduler.global_batch_size 2 --step_scheduler.local_batch_size 2 --lr_scheduler.lr_warmup_steps 0 " ..
            "--checkpoint.checkpoint_dir '%s' > '%s.log' 2>&1", root .. "/xdg", exe, name, run, run)
        local rc = os.execute(cmd)
        local f = io.open(run .. ".log", "rb")
        local log = f and f:read("*a") or ""
        if f then f:close() end
        local first, last = log:match("done: 4 steps in [%d%.]+ s, loss ([%d%.]+) %-> ([%d%.]+)")
        T.ok((rc == 0 or rc == true) and first ~= nil and tonumber(last) < tonumber(first),
            string.format("recipes/%s.lua: 4 demo steps, the loss falls (%s -> %s)", name, tostring(first), tostring(last)),
            (rc == 0 or rc == true) and "" or log)
        local exported = run .. "/epoch_0_step_3/diffusers"
        local ok, m = pcall(Wan.from_pretrained, exported .. "/transformer")
        T.ok(ok and fs.isfile(exported .. "/model_index.json") and m:num_parameters() == 161536,
            name .. ": the consolidated export is a diffusers WanPipeline folder that loads back", not ok and m or nil)
    end
    fs.remove_tree(root)
end

do  -- registry
    T.ok(models.WanTransformer3DModel == Wan and models.get("WanTransformer3DModel") == Wan and
        pipeline._import_diffusers_class("WanTransformer3DModel") == Wan, "the registry resolves WanTransformer3DModel")
end

T.done()
