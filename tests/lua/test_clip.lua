-- tests/lua/test_clip.lua: CLIPTextModel (nemo.models.clip, FLUX.1's text_encoder) against
-- transformers' golden case clip_text_tiny (tests/golden/clip_text_tiny, made by its
-- make_golden.py; found by tests/lua/golden.lua): parameter names and shapes equal the file's
-- (legacy text_model.* layout with the ignored position_ids buffer); float32 outputs
-- (last_hidden_state, pooler_output, every hidden state; no mask, right-padding mask, left-padding
-- mask) within 2e-5 * max|ref| and float64 within 1e-10 * max|ref|; the two pooling conventions
-- (eos_token_id 2: argmax, else the first eos) and two more activations (config variants on the
-- same weights); bf16 against the float32 reference; the call forms; a transformers-5
-- (unprefixed) file, sharded weights and a full CLIPConfig / CLIPModel folder; and the errors.
-- Golden comparisons FAIL when the case is absent.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local F = nemo.F
local json = require "nemo.json"
local fs = require "nemo.fs"
local clip = require "nemo.models.clip"
local golden = require "golden"
local CLIP = clip.CLIPTextModel
local shape_str = nemo.Tensor.shape_str

-- ==== helpers ====

local close = T.close   -- (it fails on a missing tensor and on differing shapes)
local bitwise = T.same_values
local tmpdir = T.tmpdir
local rmtree = T.rmtree

local function copy(t)
    local c = {}
    for k, v in pairs(t) do c[k] = v end
    return c
end

-- a folder holding config (a table) and the given weights (name -> tensor) as model.safetensors
local function folder_with(cfg, sd)
    local d = tmpdir()
    json.write_file(d .. "/config.json", cfg, {indent = 2})
    if sd then nemo.save_file(sd, d .. "/model.safetensors", {format = "pt"}) end
    return d
end

local max_err = {f32 = 0, f64 = 0}   -- the worst relative errors, reported at the end
local function golden_close(kind, a, ref, rtol, name)
    local d, r = T.maxdiff(a, ref)
    if r > 0 and d / r > max_err[kind] then max_err[kind] = d / r end
    return close(a, ref, rtol, 0, name)
end

-- ==== the golden case ====

local dir, why = golden.case("clip_text_tiny", "config.json")
if not dir then T.ok(false, "clip_text_tiny golden comparisons: " .. why) end

if dir then
    local c32 = nemo.load_file(dir .. "/case.safetensors")
    local c64 = nemo.load_file(dir .. "/case_f64.safetensors")
    local meta = json.read_file(dir .. "/golden.json")
    local file = nemo.load_file(dir .. "/model.safetensors")
    local ids, mask, mask_left = c32.input_ids, c32.attention_mask, c32.attention_mask_left

    -- names and shapes
    local m = CLIP.from_pretrained(dir)
    local sd, keys = m:state_dict()
    local same, nfile, bad = true, 0, {}
    for k, t in pairs(file) do
        if k ~= "text_model.embeddings.position_ids" then
            nfile = nfile + 1
            if sd[k] == nil or shape_str(sd[k].shape) ~= shape_str(t.shape) then same = false; bad[#bad + 1] = k end
        end
    end
    T.ok(same and nfile == #keys, "clip_text_tiny: parameter names and shapes equal the weight file's (" .. #keys ..
        " tensors)", "differ: " .. table.concat(bad, ", "))
    T.ok(file["text_model.embeddings.position_ids"] ~= nil and sd["text_model.embeddings.position_ids"] == nil,
        "the file's text_model.embeddings.position_ids buffer is ignored")
    T.is(m:num_parameters(), meta.num_params, "num_parameters agrees with golden.json")
    local want = {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"}
    for _, p in ipairs {"self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                        "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"} do
        want[#want + 1] = "text_model.encoder.layers.0." .. p .. ".weight"
        want[#want + 1] = "text_model.encoder.layers.0." .. p .. ".bias"
    end
    local order_ok = true
    for i, k in ipairs(want) do if keys[i] ~= k then order_ok = false end end
    T.ok(order_ok and keys[#keys] == "text_model.final_layer_norm.bias",
        "state_dict order is transformers' (embeddings, k/v/q/out_proj, layer_norm1, fc1, fc2, layer_norm2, ..., final_layer_norm)")
    T.is(m:dtype(), "float32", "from_pretrained default dtype float32")

    -- float32 / float64 against transformers
    local function check_run(model, case, kind, rtol, prefix)
        local tag = string.format("%s %s", kind, prefix == "" and "base" or prefix:sub(1, -2))
        local o = model{input_ids = ids, output_hidden_states = prefix == ""}
        golden_close(kind, o.last_hidden_state, case[prefix .. "last_hidden_state"], rtol,
            string.format("%s: last_hidden_state within %g * max|ref|", tag, rtol))
        golden_close(kind, o.pooler_output, case[prefix .. "pooler_output"], rtol,
            string.format("%s: pooler_output within %g * max|ref|", tag, rtol))
        local om = model{input_ids = ids, attention_mask = mask, output_hidden_states = prefix == ""}
        golden_close(kind, om.last_hidden_state, case[prefix .. "masked.last_hidden_state"], rtol,
            string.format("%s: masked last_hidden_state within %g * max|ref|", tag, rtol))
        if prefix == "" then
            T.is(#o.hidden_states, 3, kind .. ": hidden_states has embeddings + one per layer")
            for i = 0, 2 do
                golden_close(kind, o.hidden_states[i + 1], case["hidden_states." .. i], rtol,
                    string.format("%s: hidden_states.%d within %g * max|ref|", tag, i, rtol))
            end
            for i = 1, 2 do
                golden_close(kind, om.hidden_states[i + 1], case["masked.hidden_states." .. i], rtol,
                    string.format("%s: masked hidden_states.%d within %g * max|ref|", tag, i, rtol))
            end
            golden_close(kind, om.pooler_output, case["masked.pooler_output"], rtol,
                string.format("%s: masked pooler_output within %g * max|ref|", tag, rtol))
            local ol = model{input_ids = ids, attention_mask = mask_left}
            golden_close(kind, ol.last_hidden_state, case["left.last_hidden_state"], rtol,
                string.format("%s: left-padding mask (fully masked query rows) last_hidden_state within %g * max|ref|",
                    tag, rtol))
        end
        return o, om
    end

    local o32, om32 = check_run(m, c32, "f32", 2e-5, "")
    local m64 = CLIP.from_pretrained(dir, {torch_dtype = "float64"})
    T.is(m64:dtype(), "float64", "from_pretrained torch_dtype float64")
    check_run(m64, c64, "f64", 1e-10, "")

    -- the variants: same weights, other configs
    local wsd = {}
    for k, t in pairs(file) do if not k:find("position_ids", 1, true) then wsd[k] = t end end
    for _, name in ipairs {"eos96_gelu", "gelu_new"} do
        local cfg = json.read_file(dir .. "/config_" .. name .. ".json")
        for _, spec in ipairs {{"float32", c32, "f32", 2e-5}, {"float64", c64, "f64", 1e-10}} do
            local v = CLIP(cfg, {dtype = spec[1]})
            v:load_state_dict(wsd)
            check_run(v, spec[2], spec[3], spec[4], name .. ".")
        end
    end

    -- pooling conventions, on our own outputs
    local function pooled_at(o, p)
        local ok = true
        for b = 1, #p do
            if not bitwise(o.pooler_output:select(0, b - 1), o.last_hidden_state:select(0, b - 1):select(0, p[b])) then
                ok = false
            end
        end
        return ok
    end
    T.ok(pooled_at(o32, {3, 8}), "eos_token_id 2: pooler_output is the row at input_ids.argmax(-1) (first maximum: 3, 8)")
    T.ok(not pooled_at(o32, {2, 3}), "eos_token_id 2: not the first id == 2 (2, 3)")
    do
        local v = CLIP(json.read_file(dir .. "/config_eos96_gelu.json"))
        v:load_state_dict(wsd)
        local o = v{input_ids = ids}
        T.ok(pooled_at(o, {6, 8}), "eos_token_id 96: pooler_output at the first id == 96 (6, 8), not the argmax (3, 8)")
        local none = nemo.tensor({{95, 13, 2, 45, 7}}, {dtype = "int64"})
        T.ok(pooled_at(v{input_ids = none}, {0}), "eos_token_id 96, no 96 in the row: position 0 (transformers' argmax of zeros)")
        local ties = nemo.tensor({{95, 98, 3, 98}}, {dtype = "int64"})
        T.ok(pooled_at(m{input_ids = ties}, {1}), "eos_token_id 2: ties go to the first maximum")
    end

    -- the mask
    do
        local lh, mh = o32.last_hidden_state, om32.last_hidden_state
        close(mh:select(0, 0):narrow(0, 0, 7), lh:select(0, 0):narrow(0, 0, 7), 1e-6, 0,
            "right padding, row 0: the unpadded positions are those without a mask within 1e-6 * max|ref| (causal)")
        close(mh:select(0, 1):narrow(0, 0, 9), lh:select(0, 1):narrow(0, 0, 9), 1e-6, 0,
            "right padding, row 1: the unpadded positions are those without a mask within 1e-6 * max|ref| (causal)")
        T.ok(not bitwise(lh:select(0, 0):narrow(0, 7, 5), mh:select(0, 0):narrow(0, 7, 5)),
            "right padding: the padded positions change")
        local ones = nemo.ones({2, 12}, {dtype = "int64"})
        T.ok(bitwise(m{input_ids = ids, attention_mask = ones}.last_hidden_state, lh),
            "an all-ones attention_mask is the same as none")
        local bmask = F.ne(mask, 0)
        T.ok(bitwise(m{input_ids = ids, attention_mask = bmask}.last_hidden_state, mh), "a bool attention_mask works")
        local fmask = mask:to{dtype = "float32"}
        T.ok(bitwise(m{input_ids = ids, attention_mask = fmask}.last_hidden_state, mh), "a float 0/1 attention_mask works")
    end

    -- call forms
    do
        T.ok(bitwise(m(ids).last_hidden_state, o32.last_hidden_state), "model(input_ids) is model{input_ids = ...}")
        local r = m(ids, {attention_mask = mask})
        T.ok(bitwise(r.pooler_output, om32.pooler_output), "model(input_ids, {attention_mask = ...})")
        local t = m{input_ids = ids, return_dict = false}
        T.ok(bitwise(t[1], o32.last_hidden_state) and bitwise(t[2], o32.pooler_output),
            "return_dict = false: {last_hidden_state, pooler_output}")
        T.ok(o32.hidden_states ~= nil and m(ids).hidden_states == nil, "hidden_states only when asked")
        local one = m(ids:select(0, 1))
        T.is(shape_str(one.last_hidden_state.shape), "(1, 12, 32)", "1-D input_ids: batch 1")
        close(one.last_hidden_state:select(0, 0), o32.last_hidden_state:select(0, 1), 1e-6, 0,
            "1-D input_ids: the same row within 1e-6 * max|ref|")
        local pid = nemo.arange(0, 12, 1, {dtype = "int64"})
        T.ok(bitwise(m{input_ids = ids, position_ids = pid}.last_hidden_state, o32.last_hidden_state),
            "position_ids 0..S-1 is the default")
        local short = ids:narrow(1, 0, 5)
        close(m(short).last_hidden_state, o32.last_hidden_state:narrow(1, 0, 5), 1e-6, 0,
            "a shorter input gives the prefix within 1e-6 * max|ref| (causal, positions 0..S-1)")
        local i32 = ids:to{dtype = "int32"}
        T.ok(bitwise(m(i32).last_hidden_state, o32.last_hidden_state), "int32 input_ids")
    end

    -- bf16
    do
        local mb = CLIP.from_pretrained(dir, {torch_dtype = "bfloat16"})
        local ob = mb{input_ids = ids, attention_mask = mask}
        T.is(ob.last_hidden_state.dtype, "bfloat16", "bf16 model: bf16 outputs")
        close(ob.last_hidden_state, c32["masked.last_hidden_state"], 2e-2, 0,
            "bf16 last_hidden_state within 2e-2 * max|ref| of transformers' float32")
        close(ob.pooler_output, c32["masked.pooler_output"], 2e-2, 0,
            "bf16 pooler_output within 2e-2 * max|ref| of transformers' float32")
    end

    -- gradients flow (the encoder is usually frozen, but LoRA / fine-tuning may train it)
    do
        local mg = CLIP.from_pretrained(dir)
        local o = mg{input_ids = ids, attention_mask = mask}
        local loss = (o.pooler_output * o.pooler_output):sum() + o.last_hidden_state:sum()
        loss:backward()
        local g = mg.text_model.encoder.layers:get(1).self_attn.q_proj.weight.grad
        local te = mg.text_model.embeddings.token_embedding.weight.grad
        T.ok(g ~= nil and te ~= nil and F.all(F.eq(g, g)):item() and g:abs():max():item() > 0,
            "backward reaches q_proj and the token embedding, finite and nonzero")
    end

    -- other file layouts
    do
        local cfg = json.read_file(dir .. "/config.json")
        -- transformers 5's save_pretrained layout: no text_model. prefix, no position_ids
        local unpref = {}
        for k, t in pairs(wsd) do unpref[k:gsub("^text_model%.", "")] = t end
        local d = folder_with(cfg, unpref)
        local ok, mu = pcall(CLIP.from_pretrained, d)
        T.ok(ok and bitwise(mu(ids).last_hidden_state, o32.last_hidden_state),
            "a transformers-5 file (no text_model. prefix) loads to the same model", not ok and tostring(mu) or nil)
        rmtree(d)
        -- sharded weights
        d = folder_with(cfg)
        local a, b, map = {}, {}, {}
        for k, t in pairs(file) do
            local part = k:find("layers.1.", 1, true) and b or a
            part[k] = t
            map[k] = rawequal(part, a) and "model-00001-of-00002.safetensors" or "model-00002-of-00002.safetensors"
        end
        nemo.save_file(a, d .. "/model-00001-of-00002.safetensors", {format = "pt"})
        nemo.save_file(b, d .. "/model-00002-of-00002.safetensors", {format = "pt"})
        json.write_file(d .. "/model.safetensors.index.json", {metadata = {total_size = 0}, weight_map = map})
        ok, mu = pcall(CLIP.from_pretrained, d)
        T.ok(ok and bitwise(mu(ids).last_hidden_state, o32.last_hidden_state),
            "sharded weights (model.safetensors.index.json) load", not ok and tostring(mu) or nil)
        rmtree(d)
        -- a full CLIPModel folder: CLIPConfig with text_config, extra towers in the weights; subfolder
        local full = {architectures = {"CLIPModel"}, model_type = "clip", projection_dim = 32,
            logit_scale_init_value = 2.6592, text_config = cfg,
            vision_config = {hidden_size = 16, num_hidden_layers = 1, patch_size = 4, image_size = 8}}
        local sdf = copy(file)
        sdf["logit_scale"] = nemo.tensor({2.6592})
        sdf["text_projection.weight"] = nemo.zeros(32, 32)
        sdf["visual_projection.weight"] = nemo.zeros(32, 16)
        sdf["vision_model.post_layernorm.weight"] = nemo.ones(16)
        local root = tmpdir()
        fs.mkdirs(root .. "/text_encoder")
        json.write_file(root .. "/text_encoder/config.json", full, {indent = 2})
        nemo.save_file(sdf, root .. "/text_encoder/model.safetensors", {format = "pt"})
        local warned = {}
        local real_stderr = io.stderr
        io.stderr = {write = function(_, ...) for _, x in ipairs {...} do warned[#warned + 1] = x end end}
        ok, mu = pcall(CLIP.from_pretrained, root, {subfolder = "text_encoder"})
        io.stderr = real_stderr
        T.ok(table.concat(warned):find("4 tensors of the other CLIPModel parts", 1, true) ~= nil,
            "the unused CLIPModel tensors are reported in a warning", "stderr was: " .. table.concat(warned))
        T.ok(ok and mu.config.hidden_size == 32 and mu.config.eos_token_id == 2 and
             bitwise(mu(ids).last_hidden_state, o32.last_hidden_state),
            "a CLIPConfig (nested text_config) + CLIPModel weights folder loads the text tower (subfolder)",
            not ok and tostring(mu) or nil)
        rmtree(root)

        -- errors
        local function load_err(c, pattern, name, weights)
            local dd = folder_with(c, weights == nil and wsd or weights or nil)
            T.raises(function() return CLIP.from_pretrained(dd) end, pattern, name)
            rmtree(dd)
        end
        local c1 = copy(cfg); c1.hidden_size = nil
        load_err(c1, "config%.json'%): CLIPTextModel: config key 'hidden_size' is missing",
            "missing config key: error names the key and the config file")
        local c2 = copy(cfg); c2.num_hidden_layers = "2"
        load_err(c2, "config key 'num_hidden_layers' must be a positive integer, got string \"2\"",
            "wrong config type: error names the key, what was expected and what was found")
        local c3 = {text_config = copy(cfg)}; c3.text_config.vocab_size = nil
        load_err(c3, "config key 'text_config.vocab_size' is missing", "nested text_config: missing key named as text_config.vocab_size")
        local c4 = copy(cfg); c4.hidden_act = "swiglu"
        load_err(c4, "hidden_act' must be one of quick_gelu", "unsupported hidden_act: error lists the supported ones")
        local c5 = copy(cfg); c5.num_attention_heads = 5
        load_err(c5, "must be a multiple of num_attention_heads", "hidden_size not divisible by the heads")
        local c6 = copy(cfg); c6.eos_token_id = {2, 3}
        load_err(c6, "config key 'eos_token_id' must be an integer", "eos_token_id must be an integer")
        local c7 = copy(cfg); c7.intermediate_size = 36
        load_err(c7, "shape mismatch for text_model%.encoder%.layers%.0%.mlp%.fc1%.weight: checkpoint %(37, 32%) vs model %(36, 32%)",
            "wrong shapes: error names the tensor and both shapes")
        local missing = copy(wsd); missing["text_model.final_layer_norm.bias"] = nil
        load_err(cfg, "missing keys: text_model%.final_layer_norm%.bias", "a missing tensor is named", missing)
        load_err(cfg, "has neither model%.safetensors nor model%.safetensors%.index%.json",
            "missing weights file: error names both file names", false)
        T.raises(function() return CLIP.from_pretrained(dir .. "/nonexistent") end, "missing config file",
            "missing folder: error names the config file")
    end

    -- forward errors
    local long = nemo.zeros({1, 21}, {dtype = "int64"})
    T.raises(function() return m(long) end, "input_ids has 21 tokens per row but max_position_embeddings is 20",
        "input longer than max_position_embeddings: clear error")
    T.raises(function() return m(nemo.tensor({{1, 99}}, {dtype = "int64"})) end,
        "input_ids%[0%]%[1%] = 99 is outside the vocabulary", "an id outside the vocabulary: clear error")
    T.raises(function() return m(ids:to{dtype = "float32"}) end, "must hold integer ids", "float input_ids: error")
    T.raises(function() return m{input_ids = ids, attention_mask = mask:narrow(1, 0, 5)} end,
        "attention_mask must have input_ids' shape %(2, 12%), got %(2, 5%)", "attention_mask of the wrong shape: error")
    T.raises(function() return m{input_ids = ids, output_hidden_state = true} end, "unknown argument 'output_hidden_state'",
        "a misspelt argument: error")
    T.raises(function() return m{attention_mask = mask} end, "input_ids is required", "no input_ids: error")
end

-- ==== without the golden case ====

T.raises(function() local x = CLIP({hidden_size = 8}); return x end, "^tests/lua/test_clip%.lua:%d+: CLIPTextModel: config key 'vocab_size' is missing",
    "constructor: missing key named, at the caller's line")
T.raises(function() local x = CLIP({vocab_size = 10, hidden_size = 8.5}); return x end,
    "^tests/lua/test_clip%.lua:%d+: CLIPTextModel: config key 'hidden_size' must be a positive integer, got number 8.5",
    "constructor: wrong type named, at the caller's line")
T.raises(function() return CLIP("config.json") end, "config must be a table", "constructor: config must be a table")
do
    local tiny = CLIP({vocab_size = 10, hidden_size = 8, intermediate_size = 12, num_hidden_layers = 1,
        num_attention_heads = 2, max_position_embeddings = 6})
    T.ok(tiny.config.hidden_act == "quick_gelu" and tiny.config.eos_token_id == 49407 and tiny.config.layer_norm_eps == 1e-5,
        "defaults are CLIPTextConfig's (quick_gelu, eos 49407, eps 1e-5)")
    local o = tiny(nemo.tensor({{1, 2, 3}}, {dtype = "int64"}))
    T.is(shape_str(o.last_hidden_state.shape) .. " " .. shape_str(o.pooler_output.shape), "(1, 3, 8) (1, 8)",
        "a randomly initialised model runs: shapes")
    local sd = tiny:state_dict()
    T.ok(sd["text_model.encoder.layers.0.self_attn.q_proj.weight"] ~= nil and sd["text_model.embeddings.position_ids"] == nil,
        "module tree: text_model.encoder.layers.0.self_attn.q_proj; no position_ids buffer")
end

T.diag(string.format("worst golden errors (relative to max|ref|): float32 %.3g, float64 %.3g", max_err.f32, max_err.f64))
T.done()
