-- tests/lua/test_flux.lua: FluxTransformer2DModel against diffusers' golden cases
-- (flux_tiny and flux_tiny_guidance, found by tests/lua/golden.lua): parameter names, order and
-- shapes; float32 forward + mse loss + backward (output, loss, every parameter gradient, input
-- gradients) against case.safetensors, and the same in float64 against
-- case_f64exact.safetensors; (B,S,3) ids; gradient checkpointing (bitwise equal gradients, lower
-- peak memory); config and weight-loading errors; save_pretrained / from_pretrained round trips
-- (single file and sharded); the model registry. Golden comparisons FAIL when the cases are
-- absent.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local F = nemo.F
local models = require "nemo.models"
local flux = require "nemo.models.flux"
local json = require "nemo.json"
local Flux = flux.FluxTransformer2DModel
local golden = require "golden"

-- ==== helpers ====

local function exists(p)
    local f = io.open(p, "rb")
    if f then f:close(); return true end
    return false
end

local bitwise = T.same_values
local tmpdir = T.tmpdir
local rmtree = T.rmtree

local function write(path, text)
    local f = assert(io.open(path, "wb"))
    f:write(text)
    f:close()
end

-- inputs of a case as forward arguments (float32 or float64), with the three differentiable
-- inputs made leaves that require grad
local DIFF_INPUTS = {"hidden_states", "encoder_hidden_states", "pooled_projections"}
local function inputs_of(case, dtype)
    local args = {}
    for k, v in pairs(case) do
        local name = k:match("^input%.(.+)$")
        if name then args[name] = v:to{dtype = dtype, copy = true} end
    end
    for _, k in ipairs(DIFF_INPUTS) do args[k]:requires_grad_(true) end
    return args
end

local function step(model, args, target)
    model:zero_grad()
    for _, k in ipairs(DIFF_INPUTS) do args[k].grad = nil end
    local out = model(args)
    local loss = F.mse_loss(out, target)
    loss:backward()
    return out, loss
end

local function is_embedder_w1(name)
    return name:match("^time_text_embed%.%a+_embedder%.linear_1%.weight$") ~= nil and
        not name:match("text_embedder")
end

-- ==== golden cases ====

local function golden_case(name)
    local dir, why = golden.case(name, "config.json")
    if not dir then
        T.ok(false, name .. ": golden comparisons: " .. why)
        return
    end
    local model = Flux.from_pretrained(dir)
    local meta = json.read_file(dir .. "/case.json")
    local wf = nemo.safe_open(dir .. "/diffusion_pytorch_model.safetensors")

    -- names, order and shapes
    local sd, keys = model:state_dict()
    local order_ok = #keys == #meta.state_dict_keys
    for i, k in ipairs(meta.state_dict_keys) do order_ok = order_ok and keys[i] == k end
    T.ok(order_ok, string.format("%s: %d parameter names in diffusers' state_dict order", name, #keys))
    local shapes_ok, file_keys = true, wf:keys()
    shapes_ok = shapes_ok and #file_keys == #keys
    for _, k in ipairs(file_keys) do
        local t = sd[k]
        if t == nil or nemo.Tensor.shape_str(t.shape) ~= nemo.Tensor.shape_str(wf:get_tensor(k).shape) then
            shapes_ok = false
            T.diag("shape or name mismatch: " .. k)
        end
    end
    T.ok(shapes_ok, name .. ": parameter names and shapes equal the golden weight file's")
    local nparam = 0
    for _, p in ipairs(model:parameters()) do nparam = nparam + p:numel() end
    T.is(nparam, (model.config.guidance_embeds and 77764 or 68484), name .. ": parameter count")

    -- float32
    local case = nemo.load_file(dir .. "/case.safetensors")
    local args = inputs_of(case, "float32")
    local out, loss = step(model, args, case.target)
    T.close(out, case.output, 2e-5, 1e-7, name .. " f32 output")
    local lref = case.loss:reshape{-1}:tolist()[1]
    local lv = loss:item()
    T.ok(math.abs(lv - lref) <= 5e-6 * math.abs(lref),
        string.format("%s f32 loss %.9g vs %.9g: rel %.3g <= 5e-6", name, lv, lref, math.abs(lv - lref) / math.abs(lref)))
    local worst, worst_name, all_ok = 0, "", true
    for _, k in ipairs(keys) do
        local p = model:get_parameter(k)
        local ref = case["grad." .. k]
        local rtol = is_embedder_w1(k) and 2e-3 or 5e-5
        local g = p.grad
        if g == nil then
            all_ok = false
            T.ok(false, name .. " f32 grad." .. k .. ": no gradient")
        else
            local d, r = T.maxdiff(g, ref)
            local ok = d <= rtol * r + 1e-7
            if not ok then
                all_ok = false
                T.ok(false, string.format("%s f32 grad.%s: max_abs %.3g <= %.3g", name, k, d, rtol * r + 1e-7))
            end
            if r > 0 and d / r > worst and not is_embedder_w1(k) then worst, worst_name = d / r, k end
        end
    end
    T.ok(all_ok, string.format("%s f32: all %d parameter gradients within 5e-5*max|ref| + 1e-7 (embedder " ..
        "linear_1.weight 2e-3); worst rel %.3g (%s)", name, #keys, worst, worst_name))
    for _, k in ipairs(DIFF_INPUTS) do
        T.close(args[k].grad, case["grad_input." .. k], 2e-5, 1e-7, name .. " f32 grad_input." .. k)
    end

    -- float64, against the fully float64 reference
    model:to{dtype = "float64"}
    local c64 = nemo.load_file(dir .. "/case_f64exact.safetensors")
    local a64 = inputs_of(c64, "float64")
    local out64, loss64 = step(model, a64, c64.target)
    T.is(out64.dtype, "float64", name .. " f64: output stays float64")
    T.close(out64, c64.output, 1e-9, 0, name .. " f64 output")
    local lref64 = c64.loss:reshape{-1}:tolist()[1]
    T.ok(math.abs(loss64:item() - lref64) <= 1e-9 * math.abs(lref64),
        string.format("%s f64 loss rel %.3g <= 1e-9", name, math.abs(loss64:item() - lref64) / math.abs(lref64)))
    worst, worst_name, all_ok = 0, "", true
    for _, k in ipairs(keys) do
        local p = model:get_parameter(k)
        local ref = c64["grad." .. k]
        local rtol = is_embedder_w1(k) and 1e-8 or 1e-9
        local d, r = T.maxdiff(p.grad, ref)
        if not (d <= rtol * r) then
            all_ok = false
            T.ok(false, string.format("%s f64 grad.%s: max_abs %.3g <= %.3g", name, k, d, rtol * r))
        end
        if r > 0 and d / r > worst then worst, worst_name = d / r, k end
    end
    T.ok(all_ok, string.format("%s f64: all parameter gradients within 1e-9 relative (embedder linear_1.weight " ..
        "1e-8); worst rel %.3g (%s)", name, worst, worst_name))
    for _, k in ipairs(DIFF_INPUTS) do
        T.close(a64[k].grad, c64["grad_input." .. k], 1e-9, 0, name .. " f64 grad_input." .. k)
    end
end

golden_case("flux_tiny")
golden_case("flux_tiny_guidance")

-- ==== behaviour on a small random model (no golden files needed) ====

local small_cfg = {in_channels = 4, num_layers = 1, num_single_layers = 2, attention_head_dim = 16,
                   num_attention_heads = 2, joint_attention_dim = 24, pooled_projection_dim = 20,
                   guidance_embeds = true, axes_dims_rope = {4, 4, 8}}

local function small_model(seed, cfg)
    nemo.manual_seed(seed or 0)
    return Flux(cfg or small_cfg)
end

local function small_inputs(B, N, Tt)
    local g = nemo.Generator(7)
    local cfg = small_cfg
    local ids = nemo.zeros(N, 3)
    for i = 0, N - 1 do ids[{i, 1}] = math.floor(i / 4); ids[{i, 2}] = i % 4 end
    return {
        hidden_states = nemo.randn({B, N, cfg.in_channels}, {generator = g}),
        encoder_hidden_states = nemo.randn({B, Tt, cfg.joint_attention_dim}, {generator = g}),
        pooled_projections = nemo.randn({B, cfg.pooled_projection_dim}, {generator = g}),
        timestep = nemo.rand({B}, {generator = g}),
        guidance = nemo.full({B}, 3.5),
        img_ids = ids,
        txt_ids = nemo.randn({Tt, 3}, {generator = g}),
    }, nemo.randn({B, N, cfg.in_channels}, {generator = g})
end

do  -- deprecated (B, S, 3) ids give the same output as (S, 3)
    local m = small_model(1)
    local args = small_inputs(2, 12, 5)
    local out2 = nemo.no_grad(function() return m(args) end)
    local a3 = {}
    for k, v in pairs(args) do a3[k] = v end
    a3.img_ids = args.img_ids:unsqueeze(0):expand(2, 12, 3)
    a3.txt_ids = args.txt_ids:unsqueeze(0):expand(2, 5, 3)
    local out3 = nemo.no_grad(function() return m(a3) end)
    T.ok(bitwise(out2, out3), "(B,S,3) ids give the same output as (S,3) ids (bitwise)")
    T.is(nemo.Tensor.shape_str(out2.shape), "(2, 12, 4)", "output shape (B, N, patch^2 * out_channels)")
end

do  -- gradient checkpointing: bitwise equal gradients, lower peak memory
    local m = small_model(2, {in_channels = 4, num_layers = 2, num_single_layers = 2, attention_head_dim = 16,
        num_attention_heads = 2, joint_attention_dim = 24, pooled_projection_dim = 20, guidance_embeds = true,
        axes_dims_rope = {4, 4, 8}})
    local args, target = small_inputs(2, 64, 16)
    args.hidden_states:requires_grad_(true)
    local function run(ckpt)
        if ckpt then m:enable_gradient_checkpointing() else m:disable_gradient_checkpointing() end
        m:zero_grad()
        args.hidden_states.grad = nil
        -- no automatic collection during the step (deterministic numbers); the checkpointed
        -- model still collects at each block boundary, as it always does
        collectgarbage(); collectgarbage()
        collectgarbage("stop")
        nemo.reset_peak_memory_stats()
        local base = nemo.memory_stats().current
        local out = m(args)
        local loss = F.mse_loss(out, target)
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
    for name, g in pairs(g0) do
        n = n + 1
        if not bitwise(g, g1[name]) then all = false; T.diag("differs: " .. name) end
    end
    T.ok(all and n > 0, string.format("checkpointing: all %d parameter gradients bitwise equal", n))
    T.ok(bitwise(gi0, gi1), "checkpointing: input gradient bitwise equal")
    T.ok(peak1 < peak0, string.format("checkpointing lowers the peak memory of a step: %d < %d bytes", peak1, peak0))
end

do  -- another configuration: patch 2, out_channels != in_channels, batch 3, 7 image tokens,
    -- fractional and negative ids, no guidance: shapes, every parameter gets a gradient, and
    -- float32 agrees with float64 (the same weights)
    local cfg = {patch_size = 2, in_channels = 6, out_channels = 5, num_layers = 2, num_single_layers = 1,
                 attention_head_dim = 12, num_attention_heads = 3, joint_attention_dim = 10,
                 pooled_projection_dim = 9, guidance_embeds = false, axes_dims_rope = {2, 4, 6}}
    nemo.manual_seed(11)
    local m = Flux(cfg)
    local g = nemo.Generator(12)
    local args = {hidden_states = nemo.randn({3, 7, 6}, {generator = g}),
                  encoder_hidden_states = nemo.randn({3, 5, 10}, {generator = g}),
                  pooled_projections = nemo.randn({3, 9}, {generator = g}),
                  timestep = nemo.rand({3}, {generator = g}),
                  img_ids = nemo.randn({7, 3}, {generator = g}) * 3.7,
                  txt_ids = nemo.randn({5, 3}, {generator = g}) - 2}
    local target = nemo.randn({3, 7, 20}, {generator = g})
    local out = m(args)
    T.is(nemo.Tensor.shape_str(out.shape), "(3, 7, 20)", "patch 2, out_channels 5: output (B, N, 4*5)")
    F.mse_loss(out, target):backward()
    local g32, missing = {}, {}
    for name, p in m:named_parameters() do
        if p.grad == nil then missing[#missing + 1] = name else g32[name] = p.grad end
    end
    T.ok(#missing == 0, "every parameter receives a gradient", table.concat(missing, ", "))
    m:zero_grad()
    m:to{dtype = "float64"}
    local a64 = {}
    for k, v in pairs(args) do a64[k] = v:double() end
    local out64 = m(a64)
    F.mse_loss(out64, target:double()):backward()
    T.close(out, out64, 1e-5, 0, "float32 output vs float64 output of the same model")
    local worst, wname = 0, ""
    for name, p in m:named_parameters() do
        local d, r = T.maxdiff(g32[name], p.grad)
        if r > 0 and d / r > worst then worst, wname = d / r, name end
    end
    T.ok(worst < 1e-3, string.format("float32 gradients vs float64: worst rel %.3g < 1e-3 (%s)", worst, wname))
end

do  -- guidance must be given iff guidance_embeds
    local m = small_model(3)
    local args = small_inputs(1, 4, 3)
    args.guidance = nil
    T.raises(function() return m(args) end, "guidance is required", "guidance_embeds=true without guidance: error")
    local cfg = {}
    for k, v in pairs(small_cfg) do cfg[k] = v end
    cfg.guidance_embeds = false
    local m2 = small_model(3, cfg)
    args.guidance = nemo.full({1}, 3.5)
    T.raises(function() return m2(args) end, "no guidance embedder", "guidance_embeds=false with guidance: error")
    args.guidance = nil
    T.ok(pcall(function() return nemo.no_grad(function() return m2(args) end) end), "guidance_embeds=false runs without guidance")
    args.img_ids = nemo.zeros(5, 3)
    T.raises(function() return m2(args) end, "img_ids must have shape (4", "img_ids of the wrong length: error naming it")
end

do  -- config errors and defaults
    T.raises(function() return Flux{num_layers = "2"} end, "config key 'num_layers' must be a non-negative integer",
        "wrong-typed config field: error names the key")
    T.raises(function() return Flux{guidance_embeds = 1} end, "'guidance_embeds' must be a boolean",
        "guidance_embeds not a boolean: error names the key")
    T.raises(function() return Flux{axes_dims_rope = {16, 56}, num_layers = 0, num_single_layers = 0} end,
        "must sum to attention_head_dim", "axes_dims_rope not summing to the head dim: error")
    local m = Flux{in_channels = 4, num_layers = 0, num_single_layers = 0, attention_head_dim = 8,
        num_attention_heads = 1, joint_attention_dim = 8, pooled_projection_dim = 8, axes_dims_rope = {2, 2, 4},
        _class_name = "FluxTransformer2DModel", _diffusers_version = "0.1"}
    T.ok(m.config.patch_size == 1 and m.config.out_channels == json.null and m.out_channels == 4 and
        m.config._class_name == nil, "config defaults: patch_size 1, out_channels null -> in_channels; _ keys dropped")
end

do  -- from_pretrained errors
    local dir = tmpdir()
    T.raises(function() return Flux.from_pretrained(dir) end, dir .. "/config.json", "missing config.json: error names the file")
    write(dir .. "/config.json", "{not json")
    T.raises(function() return Flux.from_pretrained(dir) end, "is not valid JSON", "malformed config.json: error")
    local m = small_model(4)
    m:save_pretrained(dir)
    local sd = nemo.load_file(dir .. "/diffusion_pytorch_model.safetensors")
    local sd2 = {}
    for k, v in pairs(sd) do sd2[k] = v end
    sd2["proj_out.bias"] = nil
    nemo.save_file(sd2, dir .. "/diffusion_pytorch_model.safetensors", {format = "pt"})
    local ok, err = pcall(Flux.from_pretrained, dir)
    T.ok(not ok and err:find("missing keys: proj_out.bias", 1, true) and err:find(dir, 1, true),
        "weights with a missing key: error names the key and the folder", err)
    sd2["proj_out.bias"] = nemo.zeros(5)
    nemo.save_file(sd2, dir .. "/diffusion_pytorch_model.safetensors", {format = "pt"})
    ok, err = pcall(Flux.from_pretrained, dir)
    T.ok(not ok and err:find("shape mismatch for proj_out.bias", 1, true) ~= nil,
        "weights with a wrong shape: error names the key and both shapes", err)
    sd2["proj_out.bias"] = sd["proj_out.bias"]
    sd2["extra.weight"] = nemo.zeros(2)
    nemo.save_file(sd2, dir .. "/diffusion_pytorch_model.safetensors", {format = "pt"})
    ok, err = pcall(Flux.from_pretrained, dir)
    T.ok(not ok and err:find("unexpected keys: extra.weight", 1, true) ~= nil, "weights with an unexpected key: error", err)
    rmtree(dir)
end

do  -- save_pretrained / from_pretrained round trips
    local m = small_model(5)
    local args = small_inputs(1, 8, 4)
    local ref = nemo.no_grad(function() return m(args) end)
    local dir = tmpdir()
    m:save_pretrained(dir)
    local cfg = json.read_file(dir .. "/config.json")
    T.ok(cfg._class_name == "FluxTransformer2DModel" and type(cfg._diffusers_version) == "string" and
        cfg.num_single_layers == 2 and cfg.out_channels == json.null and #cfg.axes_dims_rope == 3,
        "config.json has _class_name, _diffusers_version and the config fields")
    local m2 = Flux.from_pretrained(dir)
    T.ok(bitwise(nemo.no_grad(function() return m2(args) end), ref), "save_pretrained + from_pretrained: same output (bitwise)")
    local sd1, keys1 = m:state_dict()
    local sd2 = m2:state_dict()
    local same = true
    for _, k in ipairs(keys1) do same = same and bitwise(sd1[k], sd2[k]) end
    T.ok(same, "round trip: every tensor equal")
    -- sharded
    local sdir = tmpdir()
    m:save_pretrained(sdir, {max_shard_size = 20000})
    T.ok(not exists(sdir .. "/diffusion_pytorch_model.safetensors") and
        exists(sdir .. "/diffusion_pytorch_model.safetensors.index.json"), "sharded save: index, no single file")
    local idx = json.read_file(sdir .. "/diffusion_pytorch_model.safetensors.index.json")
    local files, nkeys = {}, 0
    for _, f in pairs(idx.weight_map) do files[f] = true end
    for _ in pairs(idx.weight_map) do nkeys = nkeys + 1 end
    local nfiles, all_there = 0, true
    for f in pairs(files) do nfiles = nfiles + 1; all_there = all_there and exists(sdir .. "/" .. f) end
    T.ok(all_there, "every shard file the index names exists")
    local total = 0
    for _, k in ipairs(keys1) do total = total + sd1[k]:numel() * 4 end
    T.ok(nfiles > 1 and nkeys == #keys1 and idx.metadata.total_size == total,
        string.format("index: %d shards, %d keys, total_size %d", nfiles, nkeys, idx.metadata.total_size))
    local m3 = Flux.from_pretrained(sdir)
    T.ok(bitwise(nemo.no_grad(function() return m3(args) end), ref), "sharded round trip: same output (bitwise)")
    -- saving unsharded again over the sharded folder removes the shards
    m:save_pretrained(sdir)
    T.ok(exists(sdir .. "/diffusion_pytorch_model.safetensors") and
        not exists(sdir .. "/diffusion_pytorch_model.safetensors.index.json") and
        not exists(sdir .. "/diffusion_pytorch_model-00001-of-" .. string.format("%05d", nfiles) .. ".safetensors"),
        "re-saving unsharded removes the stale index and shards")
    -- torch_dtype
    local mb = Flux.from_pretrained(dir, {torch_dtype = "bfloat16"})
    T.is(mb.proj_out.weight.dtype, "bfloat16", "from_pretrained torch_dtype=bfloat16 casts the parameters")
    local ab = {}
    for k, v in pairs(args) do ab[k] = v:to{dtype = "bfloat16"} end
    local outb = nemo.no_grad(function() return mb(ab) end)
    T.is(outb.dtype, "bfloat16", "bf16 model: bf16 output")
    -- a bf16 model sees timestep and guidance as bf16(bf16(t) * 1000) (3.5 -> 3504); give the
    -- float32 model those values, then the two differ only by bf16 rounding
    local aq = {}
    for k, v in pairs(args) do aq[k] = v end
    for _, k in ipairs {"timestep", "guidance"} do aq[k] = (args[k]:to{dtype = "bfloat16"} * 1000):float() / 1000 end
    T.near(aq.guidance:tolist()[1] * 1000, 3504, 1e-3, "bf16: guidance 3.5 is seen as 3504, as in diffusers")
    local refq = nemo.no_grad(function() return m(aq) end)
    T.close(outb, refq, 3e-2, 0, "bf16 model output vs float32 with the same quantised timesteps (bf16 tolerance)")
    rmtree(dir)
    rmtree(sdir)
end

do  -- registry
    T.ok(models.FluxTransformer2DModel == Flux and models.get("FluxTransformer2DModel") == Flux,
        "models.FluxTransformer2DModel and models.get")
    T.raises(function() return models.get("NoSuchModel") end, "known: FluxTransformer2DModel",
        "models.get of an unknown name lists the known names")
end

T.done()
