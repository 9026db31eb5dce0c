-- tests/lua/test_clip_vision.lua: CLIPVisionModel (nemo.models.clip), the image tower Wan 2.1's
-- image-to-video pipelines use as their image_encoder, against transformers' golden case
-- clip_vision_tiny (tests/golden/clip_vision_tiny/make_golden.py): parameter names, the outputs
-- (last_hidden_state, pooler_output, every hidden state) in float32 and float64, a file with the
-- legacy vision_model. names, the registry, config and input errors. Golden comparisons FAIL
-- when the case is absent.
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local json = require "nemo.json"
local golden = require "golden"
local clip = require "nemo.models.clip"
local V = clip.CLIPVisionModel

local dir, why = golden.case("clip_vision_tiny", "case.safetensors")
if not dir then
    T.ok(false, "clip_vision_tiny golden comparisons: " .. why)
    T.done()
end
local meta = json.read_file(dir .. "/case.json")
local case = nemo.load_file(dir .. "/case.safetensors")
local c64 = nemo.load_file(dir .. "/case_f64.safetensors")

-- Tolerances: float64 rtol 1e-12 (the same ops in the same order); float32 rtol 2e-6: transformers'
-- own float32 run is within 6e-7 of float64 relative to max|ref| (case.json f32_vs_f64_rel).
for _, dt in ipairs {"float32", "float64"} do
    local m = V.from_pretrained(dir, {torch_dtype = dt})
    local ref = dt == "float64" and c64 or case
    local tol = dt == "float64" and 1e-12 or 2e-6
    local out = nemo.no_grad(function() return m{pixel_values = case.pixel_values:to{dtype = dt},
        output_hidden_states = true} end)
    T.close(out.last_hidden_state, ref.last_hidden_state, tol, 0, "CLIPVisionModel " .. dt .. ": last_hidden_state")
    T.close(out.pooler_output, ref.pooler_output, tol, 0, "CLIPVisionModel " .. dt .. ": pooler_output")
    T.is(#out.hidden_states, 4, "hidden_states: the embeddings after pre_layrnorm, then each of 3 layers")
    for i = 0, 3 do
        T.close(out.hidden_states[i + 1], ref["hidden_states." .. i], tol, 0,
            string.format("CLIPVisionModel %s: hidden_states[%d]", dt, i))
    end
end

do
    local m = V.from_pretrained(dir)
    local _, keys = m:state_dict()
    local same = #keys == #meta.keys
    for i, k in ipairs(meta.keys) do same = same and keys[i] == "vision_model." .. k end
    T.ok(same, string.format("the %d parameters are transformers' (vision_model. + the file's names), in order", #keys))
    -- a file with the legacy (transformers 4) names: vision_model.<name>, as Wan's image_encoder folders hold
    local tmp = T.tmpdir()
    local sd = nemo.load_file(dir .. "/model.safetensors")
    local renamed = {}
    for k, t in pairs(sd) do renamed["vision_model." .. k] = t end
    nemo.save_file(renamed, tmp .. "/model.safetensors")
    local f = io.open(tmp .. "/config.json", "w"); f:write(json.encode(json.read_file(dir .. "/config.json"))); f:close()
    local m2 = V.from_pretrained(tmp)
    local a = nemo.no_grad(function() return m2(case.pixel_values).last_hidden_state end)
    T.close(a, case.last_hidden_state, 2e-6, 0, "a file with vision_model. names loads the same model")
    T.rmtree(tmp)
    local reg = require("nemo.models").get("CLIPVisionModel")
    T.ok(reg == V, "the model registry knows CLIPVisionModel (pipelines load image_encoder)")
    T.raises(function() return m{pixel_values = nemo.zeros(1, 3, 24, 24)} end, "pixel_values must be %(B, 3, 28, 28%)",
        "pixel_values of the wrong size: error")
    T.raises(function() return V{hidden_size = 16, intermediate_size = 8, num_hidden_layers = 1, num_attention_heads = 2,
        image_size = 30, patch_size = 14} end, "'image_size' %(30%) must be a multiple of patch_size %(14%)",
        "image_size not a multiple of patch_size: error")
    T.raises(function() return V{hidden_size = 16} end, "'intermediate_size' is missing", "a missing size: error")
    local full = V{vision_config = {hidden_size = 8, intermediate_size = 8, num_hidden_layers = 1, num_attention_heads = 2,
        image_size = 28, patch_size = 14}, text_config = {}}
    T.ok(full.config.hidden_size == 8 and full.config.hidden_act == "quick_gelu",
        "a CLIPConfig's vision_config is read (defaults: quick_gelu)")
end

T.done()
