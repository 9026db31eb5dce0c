-- tests/lua/test_t5.lua: the T5 text encoders (nemo.models.t5: T5EncoderModel, FLUX's
-- text_encoder_2; UMT5EncoderModel, Wan's text_encoder) against Hugging Face transformers 5.24's
-- golden cases t5_tiny and umt5_tiny (tests/golden/t5_tiny/make_golden.py, found by
-- tests/lua/golden.lua): parameter names and shapes, float32 and float64 outputs with and
-- without a padding mask, sequences past relative_attention_max_distance, the relative position
-- buckets, bf16 / f16 loads, gradients, the non-gated "relu" and "gated-silu" variants; then the
-- tied embedding under either key, sharded files, config / shape / file errors and the forward
-- call forms. Golden comparisons FAIL when a case is absent.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local json = require "nemo.json"
local t5 = require "nemo.models.t5"
local golden = require "golden"
local Tensor = nemo.Tensor
local shape_str = Tensor.shape_str

-- ==== helpers ====

local close = T.close   -- (it fails on a missing tensor and on differing shapes)

-- max|a - b| / max|b|
local function rel(a, b)
    local d = (a:double() - b:double()):abs():max():item()
    return d / b:double():abs():max():item()
end

local tmpdir = T.tmpdir
local rmtree = T.rmtree

local function copy_table(t)
    local c = {}
    for k, v in pairs(t) do c[k] = v end
    return c
end

-- a model folder in a temporary directory: config (a table) and the tensors as model.safetensors
local function write_folder(cfg, tensors)
    local d = tmpdir()
    json.write_file(d .. "/config.json", cfg, {indent = 2})
    if tensors then nemo.save_file(tensors, d .. "/model.safetensors", {format = "pt"}) end
    return d
end

local function keys_of(t)
    local ks = {}
    for k in pairs(t) do ks[#ks + 1] = k end
    table.sort(ks)
    return ks
end

local function no_grad(fn) return nemo.no_grad(fn) end

-- ==== the golden cases ====

local CASES = {
    {name = "t5_tiny", cls = t5.T5EncoderModel, variant = "relu", shared_bias = true},
    {name = "umt5_tiny", cls = t5.UMT5EncoderModel, variant = "gated_silu", shared_bias = false},
}

-- f32 / f64 tolerances (relative to max|ref|): the measured f32-vs-f64exact error of transformers
-- itself is ~4e-7 (case.json), ours ~4e-7; float64 agrees to ~1e-15
local TOL32, TOL64 = 2e-5, 1e-10
local TOL_GRAD32, TOL_GRAD64 = 2e-5, 1e-9

for _, c in ipairs(CASES) do
    local dir, why = golden.case(c.name, "config.json")
    if not dir then
        T.ok(false, c.name .. " golden comparisons: " .. why)
    else
        local N = c.name
        local case = nemo.load_file(dir .. "/case.safetensors")
        local c64 = nemo.load_file(dir .. "/case_f64exact.safetensors")
        local file = nemo.load_file(dir .. "/model.safetensors")
        local cfg = json.read_file(dir .. "/config.json")
        local m = c.cls.from_pretrained(dir)
        T.is(m:dtype(), "float32", N .. ": from_pretrained default dtype float32")

        -- parameter names and shapes: the file's keys plus the tied encoder.embed_tokens.weight
        local sd, keys = m:state_dict()
        local want = copy_table(file)
        want["encoder.embed_tokens.weight"] = file["shared.weight"]
        local missing, extra, badshape = {}, {}, {}
        for k, t in pairs(want) do
            if sd[k] == nil then missing[#missing + 1] = k
            elseif shape_str(sd[k].shape) ~= shape_str(t.shape) then badshape[#badshape + 1] = k end
        end
        for k in pairs(sd) do if want[k] == nil then extra[#extra + 1] = k end end
        T.ok(#missing == 0 and #extra == 0 and #badshape == 0,
            string.format("%s: state_dict keys and shapes equal the file's + encoder.embed_tokens.weight (%d keys)", N,
                #keys), "missing: " .. table.concat(missing, ", ") .. "\nextra: " .. table.concat(extra, ", ") ..
                "\nshape: " .. table.concat(badshape, ", "))
        local meta = json.read_file(dir .. "/case.json")
        T.is(table.concat(keys, " "), table.concat(meta.state_dict_keys, " "),
            N .. ": state_dict keys in transformers' order (case.json state_dict_keys)")
        T.ok(rawequal(m.shared, m.encoder.embed_tokens) and
            m.shared.weight:data_ptr() == sd["encoder.embed_tokens.weight"]:data_ptr(),
            N .. ": shared and encoder.embed_tokens are one module / one tensor")
        local np = 0
        for _ in m:named_parameters() do np = np + 1 end
        T.is(np, #keys - 1, N .. ": named_parameters lists the tied embedding once")
        local nbias = 0
        for k in pairs(sd) do if k:find("relative_attention_bias", 1, true) then nbias = nbias + 1 end end
        T.is(nbias, c.shared_bias and 1 or cfg.num_layers,
            N .. (c.shared_bias and ": relative_attention_bias in block 0 only" or ": relative_attention_bias in every block"))
        local same = true
        for k, t in pairs(file) do
            if not T.same_bits(sd[k], t) then same = false end
        end
        T.ok(same, N .. ": loaded parameters are the file's bits")

        -- float32
        local out, out_nm, out_long
        no_grad(function()
            out = m{input_ids = case.input_ids, attention_mask = case.attention_mask}.last_hidden_state
            out_nm = m(case.input_ids).last_hidden_state
            out_long = m(case.long_input_ids, case.long_attention_mask).last_hidden_state
        end)
        close(out, case.last_hidden_state, TOL32, 0, N .. " f32 masked last_hidden_state (rtol 2e-5 x max|ref|)")
        close(out_nm, case.last_hidden_state_nomask, TOL32, 0, N .. " f32 unmasked last_hidden_state (rtol 2e-5)")
        close(out_long, case.long_last_hidden_state, TOL32, 0,
            N .. " f32 seq 40 > max_distance 16, masked (log buckets + clamp) (rtol 2e-5)")
        -- the mask matters only for the padded row
        T.ok(rel(out:select(0, 0), out_nm:select(0, 0)) < 1e-6, N .. ": row without padding: masked == unmasked")
        T.ok(rel(out:select(0, 1), out_nm:select(0, 1)) > 1e-3, N .. ": padded row: the mask changes the output")

        -- float64 (transformers run with its float32 casts promoted: case_f64exact)
        local m64 = c.cls.from_pretrained(dir, {torch_dtype = "float64"})
        no_grad(function()
            close(m64{input_ids = case.input_ids, attention_mask = case.attention_mask}.last_hidden_state,
                c64.last_hidden_state, TOL64, 0, N .. " f64 masked last_hidden_state (rtol 1e-10)")
            close(m64(case.input_ids).last_hidden_state, c64.last_hidden_state_nomask, TOL64, 0,
                N .. " f64 unmasked last_hidden_state (rtol 1e-10)")
            close(m64(case.long_input_ids, case.long_attention_mask).last_hidden_state, c64.long_last_hidden_state,
                TOL64, 0, N .. " f64 seq 40 masked (rtol 1e-10)")
        end)

        -- gradients of mean((h - target)^2): the explicit attention path (the bias mask needs
        -- its gradient)
        local g64 = nemo.load_file(dir .. "/grads_f64exact.safetensors")
        local g32 = nemo.load_file(dir .. "/grads.safetensors")
        for _, run in ipairs {{m64, g64, TOL_GRAD64, "f64", c64.target}, {m, g32, TOL_GRAD32, "f32", case.target}} do
            local model, ref, tol, what, target = run[1], run[2], run[3], run[4], run[5]
            model:zero_grad()
            local h = model{input_ids = case.input_ids, attention_mask = case.attention_mask}.last_hidden_state
            local d = h - target
            local loss = (d * d):mean()
            loss:backward()
            close(loss, ref.loss:reshape{}, tol, 0, N .. " " .. what .. " loss")
            local worst, worst_name, nmiss = 0, "", 0
            for name, p in model:named_parameters() do
                local r = ref["grad." .. name]
                if r == nil or p.grad == nil then
                    nmiss = nmiss + 1
                else
                    local e = rel(p.grad, r)
                    if e > worst then worst, worst_name = e, name end
                end
            end
            T.ok(nmiss == 0 and worst <= tol, string.format("%s %s gradients of every parameter: worst rel %.3g <= %g (%s)",
                N, what, worst, tol, worst_name), nmiss .. " without gradient or reference")
            model:zero_grad()
        end
        -- the SDPA path (no grad) and the explicit one (grad) compute the same function
        local a64, b64
        no_grad(function() a64 = m64(case.input_ids, case.attention_mask).last_hidden_state end)
        b64 = m64(case.input_ids, case.attention_mask).last_hidden_state
        close(b64:detach(), a64, 1e-13, 0, N .. ": f64 explicit attention (grad) == SDPA path (no grad)")

        -- bf16: transformers' own bf16 run differs from its f32 by ~1e-2 (case.json)
        local mb = c.cls.from_pretrained(dir, {torch_dtype = "bfloat16"})
        local ob
        no_grad(function() ob = mb(case.input_ids, case.attention_mask).last_hidden_state end)
        T.is(ob.dtype, "bfloat16", N .. " bf16: output dtype")
        close(ob, case.last_hidden_state, 2e-2, 0, N .. " bf16 vs f32 reference (rtol 2e-2)")
        close(ob, case.last_hidden_state_bf16, 2e-2, 0, N .. " bf16 vs transformers' bf16 (rtol 2e-2)")

        -- f16: the wo weights stay float32 (transformers' _keep_in_fp32_modules)
        local mh = c.cls.from_pretrained(dir, {torch_dtype = "float16"})
        local wo_ok, other_ok = true, true
        for name, p in mh:named_parameters() do
            if name:match("%.wo%.weight$") then wo_ok = wo_ok and p.dtype == "float32"
            else other_ok = other_ok and p.dtype == "float16" end
        end
        T.ok(wo_ok and other_ok, N .. " f16: wo weights float32, the others float16")
        local oh
        no_grad(function() oh = mh(case.input_ids, case.attention_mask).last_hidden_state end)
        T.is(oh.dtype, "float16", N .. " f16: output dtype")
        close(oh, case.last_hidden_state, 5e-3, 0, N .. " f16 vs f32 reference (rtol 5e-3)")
        close(oh, case.last_hidden_state_f16, 5e-3, 0, N .. " f16 vs transformers' f16 (rtol 5e-3)")

        -- deterministic
        local again
        no_grad(function() again = m{input_ids = case.input_ids, attention_mask = case.attention_mask}.last_hidden_state end)
        T.ok(T.same_bits(out, again), N .. ": forward is bitwise deterministic")

        -- the variant: another feed-forward type
        local vdir = dir .. "/" .. c.variant
        local vcase = nemo.load_file(vdir .. "/case.safetensors")
        local v64 = nemo.load_file(vdir .. "/case_f64exact.safetensors")
        local vm = c.cls.from_pretrained(vdir)
        local vm64 = c.cls.from_pretrained(vdir, {torch_dtype = "float64"})
        local ff = vm.encoder.block:get(1).layer:get(2).DenseReluDense
        if c.variant == "relu" then
            T.ok(ff.wi ~= nil and ff.wi_0 == nil and vm.config.dense_act_fn == "relu",
                N .. "/relu: non-gated DenseReluDense (wi, wo), relu")
        else
            T.ok(ff.wi_0 ~= nil and vm.config.dense_act_fn == "silu", N .. "/gated_silu: gated, silu")
        end
        no_grad(function()
            close(vm(vcase.input_ids, vcase.attention_mask).last_hidden_state, vcase.last_hidden_state, TOL32, 0,
                N .. "/" .. c.variant .. " f32 masked (rtol 2e-5)")
            close(vm(vcase.input_ids).last_hidden_state, vcase.last_hidden_state_nomask, TOL32, 0,
                N .. "/" .. c.variant .. " f32 unmasked (rtol 2e-5)")
            close(vm64(vcase.input_ids, vcase.attention_mask).last_hidden_state, v64.last_hidden_state, TOL64, 0,
                N .. "/" .. c.variant .. " f64 masked (rtol 1e-10)")
        end)
    end
end

-- ==== relative position buckets ====

do
    local dir, why = golden.case("t5_tiny", "case.safetensors")
    if not dir then
        T.ok(false, "t5_tiny relative position buckets: " .. why)
    else
        local case = nemo.load_file(dir .. "/case.safetensors")
        local relpos = case.relative_position:tolist()
        local n = 0
        for _, k in ipairs(keys_of(case)) do
            local nb, md = k:match("^buckets%.(%d+)_(%d+)$")
            if nb then
                n = n + 1
                local ref = case[k]:tolist()
                local bad = {}
                for i, r in ipairs(relpos) do
                    local b = t5.relative_position_bucket(r, tonumber(nb), tonumber(md))
                    if b ~= ref[i] and #bad < 5 then bad[#bad + 1] = string.format("rel %d: %d vs %d", r, b, ref[i]) end
                end
                T.ok(#bad == 0, string.format("buckets (num_buckets %s, max_distance %s) equal transformers' for " ..
                    "relative positions -600..600", nb, md), table.concat(bad, "\n"))
            end
        end
        T.is(n, 5, "five bucket settings checked (including the production 32 / 128)")
    end
end

-- ==== files: tied embeddings, shards, errors ====

local dir, why = golden.case("t5_tiny", "config.json")
if not dir then
    T.ok(false, "t5_tiny file checks: " .. why)
else
    local cfg = json.read_file(dir .. "/config.json")
    local file = nemo.load_file(dir .. "/model.safetensors")
    local case = nemo.load_file(dir .. "/case.safetensors")
    local function run(model)
        local o
        no_grad(function() o = model(case.input_ids, case.attention_mask).last_hidden_state end)
        return o
    end
    local base = run(t5.T5EncoderModel.from_pretrained(dir))

    -- the embedding under encoder.embed_tokens.weight only
    local only_embed = copy_table(file)
    only_embed["encoder.embed_tokens.weight"] = file["shared.weight"]
    only_embed["shared.weight"] = nil
    local d1 = write_folder(cfg, only_embed)
    local m1 = t5.T5EncoderModel.from_pretrained(d1)
    T.ok(T.same_bits(run(m1), base), "tied embedding: a file with encoder.embed_tokens.weight only loads, same output")
    T.ok(T.same_bits(m1.shared.weight, file["shared.weight"]), "tied embedding: shared.weight filled from embed_tokens")
    rmtree(d1)

    -- both keys; with different values shared.weight wins (transformers ties embed_tokens to it)
    local both = copy_table(file)
    both["encoder.embed_tokens.weight"] = file["shared.weight"] * 0
    local d2 = write_folder(cfg, both)
    local m2 = t5.T5EncoderModel.from_pretrained(d2)
    T.ok(T.same_bits(run(m2), base), "tied embedding: a file with both keys loads; shared.weight is used")
    rmtree(d2)

    -- neither key: a strict-load error naming them
    local neither = copy_table(file)
    neither["shared.weight"] = nil
    local d3 = write_folder(cfg, neither)
    T.raises(function() t5.T5EncoderModel.from_pretrained(d3) end, "missing keys: shared.weight, encoder.embed_tokens.weight",
        "no embedding in the file: error lists shared.weight and encoder.embed_tokens.weight")
    rmtree(d3)

    -- shards named by model.safetensors.index.json
    local d4 = tmpdir()
    json.write_file(d4 .. "/config.json", cfg, {indent = 2})
    local s1, s2, wm = {}, {}, {}
    for i, k in ipairs(keys_of(file)) do
        local shard = i % 2 == 0 and s2 or s1
        shard[k] = file[k]
        wm[k] = i % 2 == 0 and "model-00002-of-00002.safetensors" or "model-00001-of-00002.safetensors"
    end
    nemo.save_file(s1, d4 .. "/model-00001-of-00002.safetensors", {format = "pt"})
    nemo.save_file(s2, d4 .. "/model-00002-of-00002.safetensors", {format = "pt"})
    json.write_file(d4 .. "/model.safetensors.index.json", {metadata = {total_size = 0}, weight_map = wm}, {indent = 2})
    T.ok(T.same_bits(run(t5.T5EncoderModel.from_pretrained(d4)), base), "sharded model.safetensors.index.json loads, same output")
    rmtree(d4)

    -- subfolder, and a full encoder-decoder checkpoint's decoder.* / lm_head.* keys are ignored
    local d5 = tmpdir()
    local full = copy_table(file)
    full["decoder.block.0.layer.0.SelfAttention.q.weight"] = file["encoder.block.0.layer.0.SelfAttention.q.weight"]
    full["lm_head.weight"] = file["shared.weight"]
    os.execute("mkdir -p '" .. d5 .. "/text_encoder_2'")
    json.write_file(d5 .. "/text_encoder_2/config.json", cfg, {indent = 2})
    nemo.save_file(full, d5 .. "/text_encoder_2/model.safetensors", {format = "pt"})
    T.ok(T.same_bits(run(t5.T5EncoderModel.from_pretrained(d5, {subfolder = "text_encoder_2"})), base),
        "subfolder; decoder.* and lm_head.* keys of a full T5 checkpoint are ignored")
    rmtree(d5)

    -- errors
    local function cfg_with(changes, drop)
        local c = copy_table(cfg)
        for k, v in pairs(changes) do c[k] = v end
        if drop then c[drop] = nil end
        return c
    end
    local d6 = write_folder(cfg_with({}, "d_model"), file)
    T.raises(function() t5.T5EncoderModel.from_pretrained(d6) end, "missing the required key 'd_model'",
        "missing config key: error names the key")
    T.raises(function() t5.T5EncoderModel.from_pretrained(d6) end, d6 .. "/config.json",
        "missing config key: error names the config file")
    rmtree(d6)
    local d7 = write_folder(cfg_with{num_heads = "4"}, file)
    T.raises(function() t5.T5EncoderModel.from_pretrained(d7) end,
        "config key 'num_heads' must be a positive integer, got string \"4\"", "wrong config type: error names key and value")
    rmtree(d7)
    T.raises(function() t5.T5EncoderModel(cfg_with{feed_forward_proj = "gated-gelu-x"}) end,
        "feed_forward_proj' must be of the form", "feed_forward_proj of a bad form is an error")
    T.raises(function() t5.T5EncoderModel(cfg_with({feed_forward_proj = "gated-foo"}, "dense_act_fn")) end,
        "activation 'foo' %(from config key 'feed_forward_proj'%) is not supported", "unsupported activation is an error")
    T.raises(function() t5.T5EncoderModel(cfg_with{layer_norm_epsilon = "x"}) end, "layer_norm_epsilon",
        "layer_norm_epsilon of a wrong type is an error")
    T.raises(function() t5.T5EncoderModel(cfg_with{relative_attention_num_buckets = 2}) end,
        "relative_attention_num_buckets", "relative_attention_num_buckets < 4 is an error")
    local d8 = write_folder(cfg_with{d_ff = 40}, file)
    T.raises(function() t5.T5EncoderModel.from_pretrained(d8) end,
        "shape mismatch for encoder.block.0.layer.1.DenseReluDense.wi_0.weight: checkpoint (48, 32) vs model (40, 32)",
        "wrong shapes: error names the parameter and both shapes")
    rmtree(d8)
    local d9 = write_folder(cfg_with{feed_forward_proj = "relu", dense_act_fn = "relu", is_gated_act = false}, file)
    T.raises(function() t5.T5EncoderModel.from_pretrained(d9) end, "DenseReluDense.wi.weight",
        "gated weights in a non-gated config: the missing wi.weight is named")
    rmtree(d9)
    local extra = copy_table(file)
    extra["encoder.extra.weight"] = file["shared.weight"]
    local d10 = write_folder(cfg, extra)
    T.raises(function() t5.T5EncoderModel.from_pretrained(d10) end, "unexpected keys: encoder.extra.weight",
        "an unexpected key is an error")
    rmtree(d10)
    local d11 = write_folder(cfg, nil)
    T.raises(function() t5.T5EncoderModel.from_pretrained(d11) end, "has neither model.safetensors nor model.safetensors.index.json",
        "missing weight file: error names model.safetensors")
    rmtree(d11)
    T.raises(function() t5.T5EncoderModel.from_pretrained("/nonexistent/t5") end, "missing config file '/nonexistent/t5/config.json'",
        "missing folder: error names config.json")

    -- dense_act_fn / is_gated_act in the file override feed_forward_proj (transformers' order)
    local c2 = t5.T5EncoderModel(cfg_with{feed_forward_proj = "gated-silu", dense_act_fn = "gelu_new"}).config
    T.ok(c2.dense_act_fn == "gelu_new" and c2.is_gated_act == true, "config: the file's dense_act_fn wins over feed_forward_proj")
    local c3 = t5.T5EncoderModel(cfg_with({feed_forward_proj = "gated-gelu"}, "dense_act_fn")).config
    T.ok(c3.dense_act_fn == "gelu_new", "config: gated-gelu means gelu_new")
    local c4 = t5.UMT5EncoderModel({vocab_size = 8, d_model = 8, d_kv = 2, d_ff = 8, num_layers = 1, num_heads = 2}).config
    T.ok(c4.feed_forward_proj == "gated-gelu" and c4.relative_attention_num_buckets == 32 and
        c4.relative_attention_max_distance == 128 and c4.layer_norm_epsilon == 1e-6,
        "config: umt5 defaults (gated-gelu, 32 buckets, 128, eps 1e-6)")
    local c5 = t5.T5EncoderModel({vocab_size = 8, d_model = 8, d_kv = 2, d_ff = 8, num_layers = 1, num_heads = 2}).config
    T.ok(c5.feed_forward_proj == "relu" and not c5.is_gated_act, "config: t5 default feed_forward_proj relu")

    -- forward call forms and argument errors
    local m = t5.T5EncoderModel.from_pretrained(dir)
    no_grad(function()
        local a = m{input_ids = case.input_ids, attention_mask = case.attention_mask}.last_hidden_state
        local b = m(case.input_ids, {attention_mask = case.attention_mask}).last_hidden_state
        local r = m(case.input_ids, {attention_mask = case.attention_mask, return_dict = false})[1]
        local bm = m(case.input_ids, case.attention_mask:to{dtype = "bool"}).last_hidden_state
        local emb = m.shared(case.input_ids)
        local e = m{inputs_embeds = emb, attention_mask = case.attention_mask}.last_hidden_state
        T.ok(T.same_bits(a, base) and T.same_bits(b, base) and T.same_bits(r, base) and T.same_bits(bm, base) and
            T.same_bits(e, base), "forward: {input_ids=, attention_mask=}, (ids, {attention_mask=}), return_dict=false, " ..
            "a bool mask and inputs_embeds agree bitwise")
        local ids32 = m(case.input_ids:to{dtype = "int32"}, case.attention_mask).last_hidden_state
        T.ok(T.same_bits(ids32, base), "forward: int32 input_ids")
    end)
    T.raises(function() m(case.input_ids:to{dtype = "float32"}) end, "input_ids must be an int64 %(B, S%) tensor",
        "forward: float input_ids is an error")
    T.raises(function() m(case.input_ids, case.attention_mask:narrow(1, 0, 5)) end,
        "attention_mask must be a %(2, 11%) tensor", "forward: attention_mask of a wrong shape is an error")
    T.raises(function() m{input_ids = case.input_ids, foo = 1} end, "unknown argument 'foo'", "forward: unknown argument")
    T.raises(function() m{} end, "exactly one of input_ids and inputs_embeds", "forward: no input")
end

-- ==== construction ====

do
    local cfg = {vocab_size = 16, d_model = 8, d_kv = 4, d_ff = 12, num_layers = 3, num_heads = 2,
                 relative_attention_num_buckets = 8, relative_attention_max_distance = 16,
                 feed_forward_proj = "gated-gelu"}
    nemo.manual_seed(0)
    local m = t5.T5EncoderModel(cfg)
    local u = t5.UMT5EncoderModel(cfg)
    local nt, nu = 0, 0
    for _, p in m:named_parameters() do nt = nt + p:numel() end
    for _, p in u:named_parameters() do nu = nu + p:numel() end
    local per_block = 4 * 8 * 8 + 3 * 8 * 12 + 2 * 8
    T.is(nt, 16 * 8 + 3 * per_block + 8 * 2 + 8, "T5EncoderModel(config): parameter count (one bias table)")
    T.is(nu, 16 * 8 + 3 * per_block + 3 * 8 * 2 + 8, "UMT5EncoderModel(config): parameter count (a bias table per block)")
    local ids = Tensor.tensor({{3, 5, 7, 1, 0, 0}}, {dtype = "int64"})
    local o
    no_grad(function() o = u(ids).last_hidden_state end)
    T.is(shape_str(o.shape), "(1, 6, 8)", "a freshly built model runs: (B, S, d_model)")
    local s = m.shared.weight:std():item()
    T.ok(s > 0.7 and s < 1.3, string.format("shared.weight initialised N(0, 1) as transformers (std %.3f)", s))

    -- float16: a residual stream that overflows is clamped to +-64512 after each sub-layer (as
    -- transformers' blocks do), so the final norm stays finite; without the clamp inf * rsqrt(inf)
    -- would be NaN. (model:half() converts wo too, so the stream stays float16.)
    local h = t5.T5EncoderModel(cfg):half()
    nemo.no_grad(function()
        local wo = h.encoder.block:get(1).layer:get(2).DenseReluDense.wo.weight
        wo:copy_(wo * 1e5)
        local y = h(ids).last_hidden_state
        local finite = y:float():abs():max():item() < math.huge
        T.ok(y.dtype == "float16" and finite, "float16: an overflowing residual stream is clamped, the output is finite")
    end)
end

T.done()
