-- tests/lua/golden.lua: where the golden cases (diffusers' / PyTorch's reference numbers) are,
-- for every test that reads them.
--   local golden = require "golden"
--   local dir, why = golden.case("flux_tiny")   -- "<folder>/flux_tiny", or nil and a message
--   if not dir then T.ok(false, "flux_tiny golden cases: " .. why) end
-- The folder is, in this order: $NEMO_GOLDEN when set (and then only it: a wrong path fails
-- instead of quietly using another copy); else tests/golden in the checkout (committed, see
-- tests/golden/SOURCE.md); else ../shared/golden beside the checkout. The checkout is found from
-- this file's own path, so it works from tests/lua (package.path "tests/lua/?.lua") and from
-- tests/gpu ("tests/gpu/../lua/?.lua") alike. Missing cases are a failure, never a skip: a
-- golden check that does not run must not pass.
local fs = require "nemo.fs"

local M = {}

-- "a/b/../c/./d" -> "a/c/d" (textual; "." for an empty relative path)
local function normalize(p)
    local out = {}
    for seg in p:gmatch("[^/]+") do
        if seg == ".." and #out > 0 and out[#out] ~= ".." then out[#out] = nil
        elseif seg ~= "." then out[#out + 1] = seg end
    end
    local s = table.concat(out, "/")
    if p:sub(1, 1) == "/" then return "/" .. s end
    return s == "" and "." or s
end

local src = debug.getinfo(1, "S").source:gsub("^@", "")
M.root = normalize((src:match("^(.*)/[^/]*$") or ".") .. "/../..")   -- the checkout: tests/lua/../..

-- the folders searched when NEMO_GOLDEN is not set, in order
M.candidates = {normalize(M.root .. "/tests/golden"), normalize(M.root .. "/../shared/golden")}

-- the golden folder and how it was found ("$NEMO_GOLDEN" or the search); or nil and a message
-- naming what was searched
function M.dir()
    local env = os.getenv("NEMO_GOLDEN")
    if env and env ~= "" then
        if fs.isdir(env) then return env, "$NEMO_GOLDEN" end
        return nil, string.format("no golden cases: NEMO_GOLDEN=%s is not a folder (when set, only $NEMO_GOLDEN is " ..
            "searched; unset, the search is %s)", env, table.concat(M.candidates, ", then "))
    end
    for _, d in ipairs(M.candidates) do
        if fs.isdir(d) then return d, "the search of " .. table.concat(M.candidates, ", ") end
    end
    return nil, string.format("no golden cases: NEMO_GOLDEN is not set and none of %s is a folder " ..
        "(tests/golden is committed with the checkout; see tests/golden/SOURCE.md)", table.concat(M.candidates, ", "))
end

-- the folder of one case ("flux_tiny"), or nil and a message; file (optional): a file that case
-- must hold (e.g. "adamw.safetensors"), checked too
function M.case(name, file)
    local d, how = M.dir()
    if not d then return nil, how end
    local p = d .. "/" .. name
    if not fs.isdir(p) then
        return nil, string.format("no golden case %s in %s (found through %s)", name, d, how)
    end
    if file and not fs.isfile(p .. "/" .. file) then
        return nil, string.format("no %s in golden case %s", file, p)
    end
    return p
end

-- tiny_flux_pipeline(root, {transformer = true, scheduler = true}) -> root: a complete, tiny
-- FluxPipeline folder assembled from golden cases: flux_sampling's transformer, VAE and
-- scheduler, flux_prompt's CLIP and T5 text encoders, the tokenizers case's CLIP and T5
-- tokenizers (root is created). Raises when a case is missing.
function M.tiny_flux_pipeline(root, o)
    o = o or {}
    local json = require "nemo.json"
    local src, gp, toks = M.case("flux_sampling"), M.case("flux_prompt"), M.case("tokenizers")
    if not (src and gp and toks) then error("tiny_flux_pipeline: the flux_sampling, flux_prompt or tokenizers case is missing", 2) end
    fs.mkdirs(root)
    local idx = {_class_name = "FluxPipeline", _diffusers_version = "0.40.0", vae = {"diffusers", "AutoencoderKL"},
        text_encoder = {"transformers", "CLIPTextModel"}, text_encoder_2 = {"transformers", "T5EncoderModel"},
        tokenizer = {"transformers", "CLIPTokenizer"}, tokenizer_2 = {"transformers", "T5TokenizerFast"}}
    fs.copy_tree(src .. "/vae", root .. "/vae")
    if o.transformer ~= false then
        fs.copy_tree(src .. "/transformer", root .. "/transformer")
        idx.transformer = {"diffusers", "FluxTransformer2DModel"}
    end
    if o.scheduler ~= false then
        fs.copy_tree(src .. "/scheduler", root .. "/scheduler")
        idx.scheduler = {"diffusers", "FlowMatchEulerDiscreteScheduler"}
    end
    fs.copy_tree(gp .. "/text_encoder", root .. "/text_encoder")
    fs.copy_tree(gp .. "/text_encoder_2", root .. "/text_encoder_2")
    fs.copy_tree(toks .. "/clip", root .. "/tokenizer")
    fs.copy_tree(toks .. "/t5", root .. "/tokenizer_2")
    json.write_file(root .. "/model_index.json", idx)
    return root
end

-- tiny_wan_pipeline(root) -> root: the wan_prompt case's tiny WanPipeline folder (transformer,
-- AutoencoderKLWan, UMT5, UniPC) with the tokenizers case's T5 tokenizer as its tokenizer (root
-- is created). Raises when a case is missing.
function M.tiny_wan_pipeline(root)
    local g, toks = M.case("wan_prompt"), M.case("tokenizers")
    if not (g and toks) then error("tiny_wan_pipeline: the wan_prompt or tokenizers case is missing", 2) end
    fs.mkdirs(root)
    for _, c in ipairs{"transformer", "vae", "text_encoder", "scheduler"} do fs.copy_tree(g .. "/" .. c, root .. "/" .. c) end
    fs.copy_tree(toks .. "/t5", root .. "/tokenizer")
    fs.copy_file(g .. "/model_index.json", root .. "/model_index.json")
    return root
end

-- param_shapes(T, model, ref, label): one check that model's parameter names and shapes are
-- exactly ref's ({name = "AxB", ..., _count = n}, a golden.json default_config_params table), and
-- one that the parameter count is ref._count; a mismatch is named in the diagnostics.
function M.param_shapes(T, model, ref, label)
    local sd, keys = model:state_dict()
    local ok, nref = true, 0
    for k, s in pairs(ref) do
        if k ~= "_count" then
            nref = nref + 1
            local t = sd[k]
            local got = t and table.concat(t.shape, "x") or "missing"
            if got ~= s then ok = false; T.diag(string.format("%s %s: %s vs diffusers %s", label, k, got, s)) end
        end
    end
    T.ok(ok and nref == #keys, string.format("%s: the %d parameter names and shapes equal diffusers'", label, #keys))
    T.is(model:num_parameters(), ref._count, string.format("%s: %d parameters (diffusers' count)", label, ref._count))
end

return M
