-- lua/nemo/models/clip.lua: CLIPTextModel, the CLIP text encoder FLUX.1 uses (`text_encoder`,
-- openai/clip-vit-large-patch14's text tower), and CLIPVisionModel, the image tower Wan 2.1's
-- image-to-video pipelines use (`image_encoder`), as Hugging Face transformers defines and
-- computes them (models/clip/modeling_clip.py): the same module trees and parameter names,
-- registered in the same order, so transformers folders load strictly.
--
--   local ie = clip.CLIPVisionModel.from_pretrained("Wan2.1-I2V-14B-480P-Diffusers", {subfolder = "image_encoder"})
--   local out = ie{pixel_values = px, output_hidden_states = true}   -- px (B, 3, 224, 224), CLIP-normalised
--   out.hidden_states[#out.hidden_states - 1]                         -- the penultimate layer (Wan's image tokens)
-- The image tower: [class embedding; Conv2d patches (no bias)] + position embeddings, pre_layrnorm,
-- the same encoder layers without the causal mask, post_layernorm on the class token only
-- (pooler_output); last_hidden_state is the last layer's output without a final norm.
--
--   local clip = require "nemo.models.clip"
--   local te = clip.CLIPTextModel.from_pretrained("FLUX.1-dev", {subfolder = "text_encoder",
--                                                 torch_dtype = "bfloat16", device = "cuda:0"})
--   local out = te{input_ids = ids, attention_mask = mask, output_hidden_states = false}
--   out.last_hidden_state (B, S, H), out.pooler_output (B, H) (what FLUX feeds its
--   pooled_projections), out.hidden_states = {embeddings, layer 1, ..., layer N} when asked
--   te(ids) is te{input_ids = ids}; te(ids, {attention_mask = mask}) works too.
--
-- The non-obvious rules:
-- - Parameter names are the legacy (transformers 4) ones FLUX's checkpoints hold:
--   text_model.embeddings.{token,position}_embedding.weight,
--   text_model.encoder.layers.{i}.{self_attn.{k,v,q,out}_proj, layer_norm1, mlp.fc1, mlp.fc2,
--   layer_norm2}.{weight,bias}, text_model.final_layer_norm.{weight,bias}. transformers 5 saves
--   the same tensors without the `text_model.` prefix; such files load too (the prefix is added,
--   as transformers' own PrefixChange does). A stored text_model.embeddings.position_ids buffer
--   (older files) is ignored; so are the other towers of a full CLIPModel file (vision_model.*,
--   visual_projection, text_projection, logit_scale), with a warning.
-- - config.json is a CLIPTextConfig, or a full CLIPConfig whose "text_config" object is used.
--   The six sizes (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
--   num_attention_heads, max_position_embeddings) are required; hidden_act, layer_norm_eps and
--   the token ids default to CLIPTextConfig's defaults (quick_gelu, 1e-5, bos 49406, eos 49407,
--   pad 1). Other keys are ignored.
-- - Pre-LN layers: x + attn(ln1(x)), then x + mlp(ln2(x)); final_layer_norm on the last layer.
--   Attention scale is head_dim^-0.5; attention is causal, and with an attention_mask that masks
--   something it is causal AND the padding mask (transformers' sdpa path: a boolean mask). A
--   query row whose every key is masked (only with left padding) gets a zero attention output,
--   as torch's sdpa gives it (transformers' eager path would give a uniform average instead).
-- - pooler_output: with eos_token_id == 2 (the legacy configs, FLUX.1's) the last hidden state
--   at input_ids.argmax(-1) (the first maximum: the highest id, i.e. the end-of-text token of
--   the real vocabulary, or an added token above it); otherwise at the first position where
--   input_ids == eos_token_id (0 when the row has none), exactly as transformers does.
-- - hidden_states[1] are the embeddings (token + position), hidden_states[k + 1] the output of
--   layer k; the last one is before final_layer_norm (last_hidden_state is after it).
-- - quick_gelu is x * sigmoid(1.702 x), gelu_new the tanh formula written out op by op as
--   transformers does (so bf16 rounds where it rounds); gelu is exact erf gelu.
-- - No dropout (attention_dropout is read and ignored: FLUX's text encoder is frozen and its
--   value is 0). Inputs longer than max_position_embeddings are an error.
-- Shapes: B batch, S tokens, H hidden_size, h heads, Dh = H / h.
local nemo = require "nemo"
local class = require "nemo.class"
local nn = require "nemo.nn"
local Tensor = require "nemo.tensor"
local json = require "nemo.json"
local common = require "nemo.models.common"
local mio = require "nemo.models.io"

local F = nemo.F
local free, factory = common.free, common.factory
local is_tensor, shape_str = Tensor.is_tensor, Tensor.shape_str
local null = json.null
local describe = mio.describe

local M = {}

-- ==== config ====

local function is_int(v) return type(v) == "number" and v % 1 == 0 and v >= -2^53 and v < 2^53 end

-- CLIPTextConfig's fields read here: {key, kind, default (nil: required)}. kind "int?" accepts null.
local CONFIG = {
    {"vocab_size", "size"},
    {"hidden_size", "size"},
    {"intermediate_size", "size"},
    {"num_hidden_layers", "size"},
    {"num_attention_heads", "size"},
    {"max_position_embeddings", "size"},
    {"hidden_act", "str", "quick_gelu"},
    {"layer_norm_eps", "eps", 1e-5},
    {"eos_token_id", "int", 49407},
    {"bos_token_id", "int?", 49406},
    {"pad_token_id", "int?", 1},
    {"projection_dim", "int?", 512},
    {"attention_dropout", "number", 0.0},
}
M.CONFIG_FIELDS = CONFIG

-- transformers' ACT2FN names supported here
local ACTIVATIONS = {quick_gelu = true, gelu = true, gelu_new = true, gelu_pytorch_tanh = true, relu = true,
    silu = true, swish = true}
M.ACTIVATIONS = {"quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish"}

-- resolve_config(cfg, who, plain) -> the config the model uses: the CLIPTextConfig fields above (a
-- full CLIPConfig's text_config when cfg has one), defaults filled in, unknown keys dropped.
-- Errors name the key (text_config.<key> when nested), what was expected and what was found;
-- they point at the constructor's caller, or carry no position with plain = true.
local function resolve_fields(fields, tower, cfg, who, plain)
    -- levels: fail, [bad,] resolve_fields, resolve_*config, __init, class.lua's new, the caller
    local function fail(msg, deeper) error(msg, plain and 0 or 6 + (deeper or 0)) end
    local sub = tower .. "_config"
    if type(cfg) ~= "table" or is_tensor(cfg) then
        fail(string.format("%s: config must be a table (CLIP%sConfig fields), got %s", who,
            tower == "text" and "Text" or "Vision", type(cfg)))
    end
    local prefix = ""
    if cfg[sub] ~= nil and cfg[sub] ~= null then
        if type(cfg[sub]) ~= "table" then
            fail(string.format("%s: config key '%s' must be an object (a CLIPConfig's %s tower), got %s",
                who, sub, tower, describe(cfg[sub])))
        end
        cfg, prefix = cfg[sub], sub .. "."
    end
    local out = {}
    for _, f in ipairs(fields) do
        local key, kind, default = f[1], f[2], f[3]
        local v = cfg[key]
        local function bad(what)
            fail(string.format("%s: config key '%s%s' must be %s, got %s", who, prefix, key, what, describe(v)), 1)
        end
        if v == nil or (v == null and kind == "int?") then
            if default == nil then
                fail(string.format("%s: config key '%s%s' is missing (expected a positive integer)", who, prefix,
                    key))
            end
            v = default
        elseif kind == "size" then
            if not is_int(v) or v < 1 then bad("a positive integer") end
        elseif kind == "int" then
            if not is_int(v) then bad("an integer") end
        elseif kind == "int?" then
            if not is_int(v) then bad("an integer or null") end
        elseif kind == "str" then
            if type(v) ~= "string" then bad("a string") end
        elseif kind == "eps" then
            if type(v) ~= "number" or not (v > 0) or v == math.huge then bad("a positive number") end
        elseif kind == "number" then
            if type(v) ~= "number" or v ~= v then bad("a number") end
        end
        out[key] = v
    end
    if not ACTIVATIONS[out.hidden_act] then
        fail(string.format("%s: config key '%shidden_act' must be one of %s, got %s", who, prefix,
            table.concat(M.ACTIVATIONS, ", "), describe(out.hidden_act)))
    end
    if out.hidden_size % out.num_attention_heads ~= 0 then
        fail(string.format("%s: config key '%shidden_size' (%d) must be a multiple of num_attention_heads (%d)",
            who, prefix, out.hidden_size, out.num_attention_heads))
    end
    if out.image_size ~= nil and out.image_size % out.patch_size ~= 0 then
        fail(string.format("%s: config key '%simage_size' (%d) must be a multiple of patch_size (%d)", who, prefix,
            out.image_size, out.patch_size))
    end
    return out
end
local function resolve_config(cfg, who, plain)
    local out = resolve_fields(CONFIG, "text", cfg, who, plain)
    out.causal = true
    return out
end
M.resolve_config = resolve_config

-- CLIPVisionConfig's fields read here (the image tower: CLIPVisionModel, Wan I2V's image_encoder).
local VISION_CONFIG = {
    {"hidden_size", "size"},
    {"intermediate_size", "size"},
    {"num_hidden_layers", "size"},
    {"num_attention_heads", "size"},
    {"image_size", "size"},
    {"patch_size", "size"},
    {"num_channels", "size", 3},
    {"hidden_act", "str", "quick_gelu"},
    {"layer_norm_eps", "eps", 1e-5},
    {"projection_dim", "int?", 512},
    {"attention_dropout", "number", 0.0},
}
M.VISION_CONFIG_FIELDS = VISION_CONFIG
local function resolve_vision_config(cfg, who, plain)
    local out = resolve_fields(VISION_CONFIG, "vision", cfg, who, plain)
    out.causal = false
    return out
end
M.resolve_vision_config = resolve_vision_config

-- ==== layers ====

-- transformers' ACT2FN[name](x); x is not freed
local function activation(name, x)
    if name == "quick_gelu" then                       -- x * sigmoid(1.702 * x)
        local s = x * 1.702
        local g = F.sigmoid(s)
        free(s)
        local y = x * g
        free(g)
        return y
    elseif name == "gelu" then
        return F.gelu(x)
    elseif name == "gelu_pytorch_tanh" then
        return F.gelu(x, {approximate = "tanh"})
    elseif name == "gelu_new" then
        -- 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))), in that op order
        local c3 = x:pow(3.0)
        local t1 = c3 * 0.044715
        free(c3)
        local t2 = x + t1
        free(t1)
        local t3 = t2 * math.sqrt(2.0 / math.pi)
        free(t2)
        local th = F.tanh(t3)
        free(t3)
        local p = th + 1.0
        free(th)
        local half = x * 0.5
        local y = half * p
        free(half, p)
        return y
    elseif name == "relu" then
        return F.relu(x)
    elseif name == "silu" or name == "swish" then
        return F.silu(x)
    end
    error("CLIPMLP: unsupported hidden_act '" .. tostring(name) .. "'", 2)
end

local function linear(i, o, fo) return nn.Linear(i, o, {dtype = fo.dtype, device = fo.device}) end
local function layer_norm(d, eps, fo) return nn.LayerNorm(d, {eps = eps, dtype = fo.dtype, device = fo.device}) end

-- CLIPTextEmbeddings(cfg, {dtype=, device=}): token_embedding (vocab, H), position_embedding
-- (max_pos, H). forward(input_ids (B, S), position_ids (B, S) or (S) or nil = 0..S-1) -> (B, S, H)
local CLIPTextEmbeddings = class("nemo.models.clip.CLIPTextEmbeddings", nn.Module)
M.CLIPTextEmbeddings = CLIPTextEmbeddings
function CLIPTextEmbeddings:__init(cfg, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size, {dtype = fo.dtype, device = fo.device})
    self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size,
        {dtype = fo.dtype, device = fo.device})
end
function CLIPTextEmbeddings:forward(input_ids, position_ids)
    local S = input_ids.shape[input_ids:dim()]
    local tok = self.token_embedding(input_ids)
    local pos_ids = position_ids
    if pos_ids == nil then
        pos_ids = Tensor.arange(0, S, 1, {dtype = "int64", device = input_ids.device})
    end
    local pos = self.position_embedding(pos_ids)
    if not rawequal(pos_ids, position_ids) then free(pos_ids) end
    local emb = tok + pos
    free(tok, pos)
    return emb
end

-- CLIPAttention(cfg, {dtype=, device=}): k_proj, v_proj, q_proj, out_proj (transformers' order).
-- forward(x (B, S, H), mask (B, 1, S, S) bool or nil) -> (B, S, H): causal attention (the text
-- tower; cfg.causal false: the image tower attends everywhere), or the mask when there is one.
local CLIPAttention = class("nemo.models.clip.CLIPAttention", nn.Module)
M.CLIPAttention = CLIPAttention
function CLIPAttention:__init(cfg, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    local H = cfg.hidden_size
    self.embed_dim = H
    self.num_heads = cfg.num_attention_heads
    self.head_dim = math.floor(H / self.num_heads)
    self.scale = self.head_dim ^ -0.5
    self.causal = cfg.causal ~= false
    self.k_proj = linear(H, H, fo)
    self.v_proj = linear(H, H, fo)
    self.q_proj = linear(H, H, fo)
    self.out_proj = linear(H, H, fo)
end

local function heads(self, y, B, S)
    local y4 = y:view(B, S, self.num_heads, self.head_dim)
    local t = y4:transpose(1, 2)                        -- (B, h, S, Dh)
    free(y4)
    return t
end

function CLIPAttention:forward(x, mask)
    local B, S = x.shape[1], x.shape[2]
    local q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    local qh, kh, vh = heads(self, q, B, S), heads(self, k, B, S), heads(self, v, B, S)
    free(q, k, v)
    local o
    if mask ~= nil then
        o = F.scaled_dot_product_attention(qh, kh, vh, {attn_mask = mask, scale = self.scale})
    else
        o = F.scaled_dot_product_attention(qh, kh, vh, {is_causal = self.causal, scale = self.scale})
    end
    free(qh, kh, vh)
    local ot = o:transpose(1, 2)
    local of = ot:reshape(B, S, self.embed_dim)
    free(o, ot)
    local y = self.out_proj(of)
    free(of)
    return y
end
function CLIPAttention:extra_repr()
    return string.format("embed_dim=%d, num_heads=%d, head_dim=%d", self.embed_dim, self.num_heads, self.head_dim)
end

-- CLIPMLP(cfg, {dtype=, device=}): fc1 (H -> I), activation, fc2 (I -> H).
local CLIPMLP = class("nemo.models.clip.CLIPMLP", nn.Module)
M.CLIPMLP = CLIPMLP
function CLIPMLP:__init(cfg, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    self.hidden_act = cfg.hidden_act
    self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, fo)
    self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, fo)
end
function CLIPMLP:forward(x)
    local h = self.fc1(x)
    local a = activation(self.hidden_act, h)
    free(h)
    local y = self.fc2(a)
    free(a)
    return y
end
function CLIPMLP:extra_repr() return "hidden_act='" .. self.hidden_act .. "'" end

-- CLIPEncoderLayer(cfg, {dtype=, device=}): self_attn, layer_norm1, mlp, layer_norm2.
-- forward(x, mask) -> h + mlp(ln2(h)) with h = x + attn(ln1(x)); x is not freed.
local CLIPEncoderLayer = class("nemo.models.clip.CLIPEncoderLayer", nn.Module)
M.CLIPEncoderLayer = CLIPEncoderLayer
function CLIPEncoderLayer:__init(cfg, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    self.self_attn = CLIPAttention(cfg, fo)
    self.layer_norm1 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, fo)
    self.mlp = CLIPMLP(cfg, fo)
    self.layer_norm2 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, fo)
end
function CLIPEncoderLayer:forward(x, mask)
    local n1 = self.layer_norm1(x)
    local a = self.self_attn(n1, mask)
    free(n1)
    local h = x + a
    free(a)
    local n2 = self.layer_norm2(h)
    local m = self.mlp(n2)
    free(n2)
    local y = h + m
    free(h, m)
    return y
end

-- CLIPEncoder(cfg, {dtype=, device=}): layers (num_hidden_layers CLIPEncoderLayer).
-- forward(x, mask, keep) -> the last layer's output; keep (a list) receives every layer's output.
local CLIPEncoder = class("nemo.models.clip.CLIPEncoder", nn.Module)
M.CLIPEncoder = CLIPEncoder
function CLIPEncoder:__init(cfg, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    local layers = {}
    for i = 1, cfg.num_hidden_layers do layers[i] = CLIPEncoderLayer(cfg, fo) end
    self.layers = nn.ModuleList(layers)
end
function CLIPEncoder:forward(x, mask, keep)
    local h = x
    for _, layer in self.layers:iter() do
        local y = layer(h, mask)
        if keep then keep[#keep + 1] = y
        elseif not rawequal(h, x) then free(h) end
        h = y
    end
    return h
end

-- CLIPTextTransformer(cfg, {dtype=, device=}): embeddings, encoder, final_layer_norm.
local CLIPTextTransformer = class("nemo.models.clip.CLIPTextTransformer", nn.Module)
M.CLIPTextTransformer = CLIPTextTransformer
function CLIPTextTransformer:__init(cfg, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    self.embeddings = CLIPTextEmbeddings(cfg, fo)
    self.encoder = CLIPEncoder(cfg, fo)
    self.final_layer_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, fo)
end

-- ==== the model ====

local CLIPTextModel = class("nemo.models.CLIPTextModel", nn.Module)
M.CLIPTextModel = CLIPTextModel
CLIPTextModel._no_split_modules = {"CLIPTextEmbeddings", "CLIPEncoderLayer"}

-- CLIPTextModel(config, {dtype=, device=}): config holds CLIPTextConfig's fields (or a
-- CLIPConfig's, with text_config). Child: text_model (CLIPTextTransformer).
function CLIPTextModel:__init(config, opts)
    nn.Module.__init(self)
    local cfg = resolve_config(config, "CLIPTextModel")
    self.config = cfg
    self.text_model = CLIPTextTransformer(cfg, factory(opts))
end

-- The dtype / device of the parameters (those of the token embedding).
function CLIPTextModel:dtype() return self.text_model.embeddings.token_embedding.weight.dtype end
function CLIPTextModel:device() return self.text_model.embeddings.token_embedding.weight.device end

local FORWARD_KEYS = {input_ids = true, attention_mask = true, position_ids = true, output_hidden_states = true,
    return_dict = true}

local function int_ids(t, what)
    if not is_tensor(t) then
        error(string.format("CLIPTextModel:forward: %s must be an integer tensor, got %s", what, type(t)), 3)
    end
    if t:is_floating_point() or t.dtype == "bool" then
        error(string.format("CLIPTextModel:forward: %s must hold integer ids (int64 or int32), got dtype %s", what,
            t.dtype), 3)
    end
end

-- the positions pooler_output reads, one per row (0-based), from the ids on the host; also
-- checks every id is inside the vocabulary
local function pooled_positions(self, ids)
    local rows = ids:to{device = "cpu"}:tolist()
    local eos, V = self.config.eos_token_id, self.config.vocab_size
    local pos = {}
    for b, row in ipairs(rows) do
        local best, at, first = nil, 0, nil
        for s, id in ipairs(row) do
            id = tonumber(id)
            if id < 0 or id >= V then
                error(string.format("CLIPTextModel:forward: input_ids[%d][%d] = %d is outside the vocabulary " ..
                    "(expected 0 <= id < vocab_size = %d)", b - 1, s - 1, id, V), 3)
            end
            if best == nil or id > best then best, at = id, s - 1 end   -- first maximum, as argmax
            if first == nil and id == eos then first = s - 1 end
        end
        if eos == 2 then pos[b] = at else pos[b] = first or 0 end
    end
    return pos
end

-- model:forward{input_ids=, attention_mask=, position_ids=, output_hidden_states=false,
-- return_dict=true} or model:forward(input_ids, {attention_mask=, ...}); model(...) is the same.
-- input_ids (B, S) (or (S): batch 1) integer ids; attention_mask (B, S), nonzero = attend;
-- position_ids (B, S) or (S), default 0..S-1. Returns {last_hidden_state = (B, S, H),
-- pooler_output = (B, H), hidden_states = {embeddings, layer 1, ..., layer N} when asked};
-- return_dict=false: {last_hidden_state, pooler_output[, hidden_states]} as a list.
function CLIPTextModel:forward(args, more)
    local opts
    if is_tensor(args) then
        if more ~= nil and type(more) ~= "table" then
            error("CLIPTextModel:forward: options after input_ids must be a table, got " .. type(more), 2)
        end
        opts = {}
        for k, v in pairs(more or {}) do opts[k] = v end
        if opts.input_ids ~= nil then error("CLIPTextModel:forward: input_ids given twice", 2) end
        opts.input_ids = args
    elseif type(args) == "table" then
        opts = args
    else
        error("CLIPTextModel:forward: expected input_ids (a tensor) or a table {input_ids=, attention_mask=, ...}, " ..
            "got " .. type(args), 2)
    end
    for k in pairs(opts) do
        if not FORWARD_KEYS[k] then
            error(string.format("CLIPTextModel:forward: unknown argument '%s' (input_ids, attention_mask, " ..
                "position_ids, output_hidden_states, return_dict)", tostring(k)), 2)
        end
    end
    local cfg = self.config
    local device = self:device()
    local ids = opts.input_ids
    if ids == nil then error("CLIPTextModel:forward: input_ids is required", 2) end
    int_ids(ids, "input_ids")
    if ids:dim() == 1 then ids = ids:unsqueeze(0) end
    if ids:dim() ~= 2 then
        error(string.format("CLIPTextModel:forward: input_ids must be (B, S) (or (S)), got shape %s",
            shape_str(ids.shape)), 2)
    end
    local B, S = ids.shape[1], ids.shape[2]
    if S < 1 or B < 1 then error("CLIPTextModel:forward: input_ids is empty: shape " .. shape_str(ids.shape), 2) end
    if S > cfg.max_position_embeddings then
        error(string.format("CLIPTextModel:forward: input_ids has %d tokens per row but max_position_embeddings " ..
            "is %d (truncate the prompt to at most %d tokens)", S, cfg.max_position_embeddings,
            cfg.max_position_embeddings), 2)
    end
    local pos = pooled_positions(self, ids)
    if ids.device ~= device then ids = ids:to{device = device} end

    local position_ids = opts.position_ids
    if position_ids ~= nil then
        int_ids(position_ids, "position_ids")
        local ps = position_ids.shape
        if not ((#ps == 1 and ps[1] == S) or (#ps == 2 and (ps[1] == B or ps[1] == 1) and ps[2] == S)) then
            error(string.format("CLIPTextModel:forward: position_ids must be (%d), (1, %d) or (%d, %d), got %s", S, S,
                B, S, shape_str(ps)), 2)
        end
        if position_ids.device ~= device then position_ids = position_ids:to{device = device} end
    end

    -- the attention mask: nil (plain causal attention) unless attention_mask masks something
    local mask
    local am = opts.attention_mask
    if am ~= nil then
        if not is_tensor(am) then
            error("CLIPTextModel:forward: attention_mask must be a tensor (B, S) of 0/1, got " .. type(am), 2)
        end
        if am:dim() ~= 2 or am.shape[1] ~= B or am.shape[2] ~= S then
            error(string.format("CLIPTextModel:forward: attention_mask must have input_ids' shape (%d, %d), got %s",
                B, S, shape_str(am.shape)), 2)
        end
        if am.device ~= device then am = am:to{device = device} end
        local keep = am.dtype == "bool" and am or F.ne(am, 0)
        if not F.all(keep):item() then
            local ar = Tensor.arange(0, S, 1, {dtype = "int64", device = device})
            local causal = F.ge(ar:unsqueeze(1), ar:unsqueeze(0))           -- (S, S): key j <= query i
            mask = F.logical_and(causal, keep:reshape(B, 1, 1, S))              -- (B, 1, S, S)
            free(ar, causal)
        end
        if not rawequal(keep, am) then free(keep) end
    end

    local tm = self.text_model
    local emb = tm.embeddings(ids, position_ids)
    local hidden = opts.output_hidden_states and {emb} or nil
    local h = tm.encoder(emb, mask, hidden)
    if mask ~= nil then free(mask) end
    local last = tm.final_layer_norm(h)
    if not hidden then
        if not rawequal(h, emb) then free(h) end
        free(emb)
    end

    local rows = {}
    for b = 1, B do rows[b] = last:select(0, b - 1):select(0, pos[b]) end
    local pooled = F.stack(rows, 0)
    if opts.return_dict == false then
        return {last, pooled, hidden}
    end
    return {last_hidden_state = last, pooler_output = pooled, hidden_states = hidden}
end

-- ==== files ====

local without_init = common.without_init

-- tower_remap(class_name, prefix, roots, others, what): the remap of a tower's from_pretrained:
-- transformers 5's unprefixed names (starting with one of roots) get `prefix`; the names of a full
-- CLIPModel file's other parts (starting with one of others) are dropped with a warning.
local function tower_remap(class_name, prefix, roots, others, what)
    local function starts(k, list)
        for _, p in ipairs(list) do if k:sub(1, #p) == p then return true end end
        return false
    end
    return function(sd)
        local out, dropped = {}, 0
        for k, t in pairs(sd) do
            if starts(k, others) then dropped = dropped + 1
            elseif starts(k, roots) then out[prefix .. k] = t
            else out[k] = t end
        end
        if dropped > 0 then
            io.stderr:write(string.format("warning: %s.from_pretrained: %d tensors of the other CLIPModel parts (%s) " ..
                "are not used\n", class_name, dropped, what))
        end
        return out
    end
end
local remap = tower_remap("CLIPTextModel", "text_model.", {"embeddings.", "encoder.", "final_layer_norm."},
    {"vision_model.", "visual_projection.", "text_projection.", "logit_scale"}, "vision_model, projections, logit_scale")

-- CLIPTextModel.from_pretrained(folder, {torch_dtype="float32", device="cpu", subfolder=})
-- Reads folder/config.json (CLIPTextConfig, or CLIPConfig with text_config) and
-- model.safetensors (or model.safetensors.index.json and its shards) and loads the weights
-- strictly, cast to torch_dtype (nemo.models.io.load_folder).
function CLIPTextModel.from_pretrained(folder, opts, more)
    if rawequal(folder, CLIPTextModel) then folder, opts = opts, more end   -- CLIPTextModel:from_pretrained(...)
    return mio.load_folder(folder, opts, {class_name = "CLIPTextModel",
        weights = mio.TRANSFORMERS_WEIGHTS, ignore = {"position_ids"}, remap = remap,
        build = function(cfg, dtype)
            cfg = resolve_config(cfg, "CLIPTextModel", true)   -- errors without a position: load_folder names the file
            return without_init(function() return CLIPTextModel(cfg, {dtype = dtype}) end)
        end})
end

-- ==== CLIPVisionModel (the image tower) ====

-- CLIPVisionEmbeddings(cfg, {dtype=, device=}): class_embedding (H), patch_embedding (Conv2d C ->
-- H, kernel = stride = patch_size, no bias), position_embedding ((image/patch)^2 + 1, H).
-- forward(pixel_values (B, C, image, image)) -> (B, 1 + P, H): [class; patches] + positions.
local CLIPVisionEmbeddings = class("nemo.models.clip.CLIPVisionEmbeddings", nn.Module)
M.CLIPVisionEmbeddings = CLIPVisionEmbeddings
function CLIPVisionEmbeddings:__init(cfg, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    local H = cfg.hidden_size
    self.num_patches = (cfg.image_size / cfg.patch_size) ^ 2
    self:register_parameter("class_embedding", Tensor.randn({H}, {dtype = fo.dtype, device = fo.device}))
    self.patch_embedding = nn.Conv2d(cfg.num_channels, H, cfg.patch_size, {stride = cfg.patch_size, bias = false,
        dtype = fo.dtype, device = fo.device})
    self.position_embedding = nn.Embedding(self.num_patches + 1, H, {dtype = fo.dtype, device = fo.device})
end
function CLIPVisionEmbeddings:forward(pixel_values)
    local B = pixel_values.shape[1]
    local x = pixel_values.dtype == self.patch_embedding.weight.dtype and pixel_values
        or pixel_values:to{dtype = self.patch_embedding.weight.dtype}
    local pe = self.patch_embedding(x)                       -- (B, H, g, g)
    if not rawequal(x, pixel_values) then free(x) end
    local pf = pe:flatten(2)
    local patches = pf:transpose(1, 2)                       -- (B, P, H)
    local cls = self.class_embedding:reshape(1, 1, -1):expand(B, 1, self.class_embedding.shape[1])
    local emb = F.cat({cls, patches}, 1)
    free(pe, pf, patches)
    local out = emb + self.position_embedding.weight         -- position_ids 0..P: the whole table
    free(emb)
    return out
end

-- CLIPVisionTransformer(cfg, {dtype=, device=}): embeddings, pre_layrnorm (transformers' spelling),
-- encoder, post_layernorm.
local CLIPVisionTransformer = class("nemo.models.clip.CLIPVisionTransformer", nn.Module)
M.CLIPVisionTransformer = CLIPVisionTransformer
function CLIPVisionTransformer:__init(cfg, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    self.embeddings = CLIPVisionEmbeddings(cfg, fo)
    self.pre_layrnorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, fo)
    self.encoder = CLIPEncoder(cfg, fo)
    self.post_layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, fo)
end

local CLIPVisionModel = class("nemo.models.CLIPVisionModel", nn.Module)
M.CLIPVisionModel = CLIPVisionModel
CLIPVisionModel._no_split_modules = {"CLIPEncoderLayer"}

-- CLIPVisionModel(config, {dtype=, device=}): config holds CLIPVisionConfig's fields (or a
-- CLIPConfig's, with vision_config). Child: vision_model (CLIPVisionTransformer).
function CLIPVisionModel:__init(config, opts)
    nn.Module.__init(self)
    local cfg = resolve_vision_config(config, "CLIPVisionModel")
    self.config = cfg
    self.vision_model = CLIPVisionTransformer(cfg, factory(opts))
end
function CLIPVisionModel:dtype() return self.vision_model.embeddings.patch_embedding.weight.dtype end
function CLIPVisionModel:device() return self.vision_model.embeddings.patch_embedding.weight.device end

-- model:forward{pixel_values=, output_hidden_states=false, return_dict=true} or
-- model:forward(pixel_values, {output_hidden_states=}); pixel_values (B, C, image_size,
-- image_size), normalised as CLIPImageProcessor does. Returns {last_hidden_state = (B, 1 + P, H)
-- (the last layer's output; no final norm), pooler_output = post_layernorm(last_hidden_state[:, 0])
-- (B, H), hidden_states = {pre_layrnorm(embeddings), layer 1, ..., layer N} when asked}
-- (Wan I2V reads hidden_states[N], the penultimate layer's output); return_dict=false: a list.
function CLIPVisionModel:forward(args, more)
    local opts
    if is_tensor(args) then
        opts = {}
        for k, v in pairs(more or {}) do opts[k] = v end
        opts.pixel_values = args
    elseif type(args) == "table" then
        opts = args
    else
        error("CLIPVisionModel:forward: expected pixel_values (a tensor) or a table {pixel_values=, ...}, got " ..
            type(args), 2)
    end
    for k in pairs(opts) do
        if k ~= "pixel_values" and k ~= "output_hidden_states" and k ~= "return_dict" then
            error(string.format("CLIPVisionModel:forward: unknown argument '%s' (pixel_values, output_hidden_states, " ..
                "return_dict)", tostring(k)), 2)
        end
    end
    local cfg = self.config
    local px = opts.pixel_values
    if not is_tensor(px) or px:dim() ~= 4 or px.shape[2] ~= cfg.num_channels or px.shape[3] ~= cfg.image_size or
        px.shape[4] ~= cfg.image_size then
        error(string.format("CLIPVisionModel:forward: pixel_values must be (B, %d, %d, %d), got %s", cfg.num_channels,
            cfg.image_size, cfg.image_size, is_tensor(px) and shape_str(px.shape) or type(px)), 2)
    end
    if px.device ~= self:device() then px = px:to{device = self:device()} end
    local vm = self.vision_model
    local emb = vm.embeddings(px)
    local h0 = vm.pre_layrnorm(emb)
    free(emb)
    local hidden = opts.output_hidden_states and {h0} or nil
    local last = vm.encoder(h0, nil, hidden)
    if not hidden and not rawequal(last, h0) then free(h0) end
    local cls = last:select(1, 0)
    local pooled = vm.post_layernorm(cls)
    free(cls)
    if opts.return_dict == false then return {last, pooled, hidden} end
    return {last_hidden_state = last, pooler_output = pooled, hidden_states = hidden}
end

local remap_vision = tower_remap("CLIPVisionModel", "vision_model.",
    {"embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."},
    {"text_model.", "visual_projection.", "text_projection.", "logit_scale"}, "text_model, projections, logit_scale")

-- CLIPVisionModel.from_pretrained(folder, {torch_dtype="float32", device="cpu", subfolder=}):
-- config.json (CLIPVisionConfig, or CLIPConfig with vision_config) and model.safetensors (or its
-- sharded index), loaded strictly (vision_model.* names, or transformers 5's unprefixed ones).
function CLIPVisionModel.from_pretrained(folder, opts, more)
    if rawequal(folder, CLIPVisionModel) then folder, opts = opts, more end
    return mio.load_folder(folder, opts, {class_name = "CLIPVisionModel",
        weights = mio.TRANSFORMERS_WEIGHTS, ignore = {"position_ids"}, remap = remap_vision,
        build = function(cfg, dtype)
            cfg = resolve_vision_config(cfg, "CLIPVisionModel", true)
            return without_init(function() return CLIPVisionModel(cfg, {dtype = dtype}) end)
        end})
end

-- ==== CLIPImageProcessor (what CLIPVisionModel reads) ====

-- CLIPImageProcessor(cfg): transformers' image processor config (preprocessor_config.json):
-- size {shortest_edge = n} (or {height =, width =}), crop_size {height =, width =} (or a number),
-- do_resize, do_center_crop, do_rescale, rescale_factor, do_normalize, image_mean, image_std,
-- resample (PIL's codes: 3 bicubic, the default; 1 Lanczos). proc:preprocess(image) -> {pixel_values
-- = (1, 3, crop_h, crop_w) float32}; image is a PNG / JPEG path or nemo.image.read's table. As
-- transformers' PIL backend (CLIPImageProcessorPil) computes it: the shortest edge resized to
-- size (the other to int(size * long / short)) with PIL's filter, the center crop (top, left =
-- floor of the margins / 2), x * rescale_factor, (x - mean) / std per channel. (transformers' default
-- torchvision backend resizes with torch's antialiased bicubic, a level or two apart.)
local CLIPImageProcessor = {}
CLIPImageProcessor.__index = CLIPImageProcessor
M.CLIPImageProcessor = CLIPImageProcessor
local RESAMPLE = {[1] = "lanczos", [3] = "bicubic"}
function CLIPImageProcessor.new(cfg)
    if type(cfg) ~= "table" then error("CLIPImageProcessor: config must be a table, got " .. type(cfg), 2) end
    local function flag(k, d) if cfg[k] == nil or cfg[k] == null then return d end return cfg[k] == true end
    local self = setmetatable({config = cfg}, CLIPImageProcessor)
    local size = cfg.size == nil and {shortest_edge = 224} or cfg.size
    if type(size) == "number" then size = {shortest_edge = size} end
    self.size = size
    local crop = cfg.crop_size == nil and {height = 224, width = 224} or cfg.crop_size
    if type(crop) == "number" then crop = {height = crop, width = crop} end
    self.crop = crop
    self.do_resize, self.do_center_crop = flag("do_resize", true), flag("do_center_crop", true)
    self.do_rescale, self.do_normalize = flag("do_rescale", true), flag("do_normalize", true)
    self.rescale_factor = type(cfg.rescale_factor) == "number" and cfg.rescale_factor or 1 / 255
    self.mean = type(cfg.image_mean) == "table" and cfg.image_mean or {0.48145466, 0.4578275, 0.40821073}
    self.std = type(cfg.image_std) == "table" and cfg.image_std or {0.26862954, 0.26130258, 0.27577711}
    local r = cfg.resample == nil and 3 or cfg.resample
    self.filter = RESAMPLE[r]
    if not self.filter then
        error(string.format("CLIPImageProcessor: resample %s is not supported (3 bicubic, 1 lanczos)", tostring(r)), 2)
    end
    if self.do_resize and not (type(size.shortest_edge) == "number" or (type(size.height) == "number" and
        type(size.width) == "number")) then
        error("CLIPImageProcessor: size must be {shortest_edge = n} or {height =, width =}", 2)
    end
    if self.do_center_crop and not (type(crop.height) == "number" and type(crop.width) == "number") then
        error("CLIPImageProcessor: crop_size must be {height =, width =} or a number", 2)
    end
    return self
end
setmetatable(CLIPImageProcessor, {__call = function(_, cfg) return CLIPImageProcessor.new(cfg) end})

-- CLIPImageProcessor.from_pretrained(folder) (or its parent with {subfolder =}): preprocessor_config.json
function CLIPImageProcessor.from_pretrained(folder, opts, more)
    if rawequal(folder, CLIPImageProcessor) then folder, opts = opts, more end
    if type(opts) == "table" and opts.subfolder then folder = folder .. "/" .. opts.subfolder end
    local path = folder .. "/preprocessor_config.json"
    local ok, cfg = pcall(json.read_file, path)
    if not ok then error("CLIPImageProcessor.from_pretrained: cannot read " .. path .. ": " .. tostring(cfg), 2) end
    return CLIPImageProcessor.new(cfg)
end

function CLIPImageProcessor:preprocess(image)
    local ffi = require "ffi"
    local enc = require "nemo.data.encode"
    local rgb, w, h
    if type(image) == "string" then
        rgb, w, h = enc.read_rgb(image)
    elseif type(image) == "table" and image.width and image.pixels then
        rgb, w, h = enc.rgb_of(image)
    else
        error("CLIPImageProcessor:preprocess: expected a PNG / JPEG path or an image table {width, height, pixels}, " ..
            "got " .. type(image), 2)
    end
    if self.do_resize then
        local nw, nh
        if self.size.shortest_edge then
            local sz = self.size.shortest_edge
            if w <= h then nw, nh = sz, math.floor(sz * h / w) else nw, nh = math.floor(sz * w / h), sz end
        else
            nw, nh = self.size.width, self.size.height
        end
        if nw ~= w or nh ~= h then rgb, w, h = enc.resize(rgb, w, h, nw, nh, self.filter), nw, nh end
    end
    local top, left, ch_, cw = 0, 0, h, w
    if self.do_center_crop then
        ch_, cw = self.crop.height, self.crop.width
        if ch_ > h or cw > w then
            error(string.format("CLIPImageProcessor:preprocess: the %dx%d image is smaller than the %dx%d crop", w, h, cw,
                ch_), 2)
        end
        top, left = math.floor((h - ch_) / 2), math.floor((w - cw) / 2)
    end
    local t = Tensor.empty({1, 3, ch_, cw}, {dtype = "float32"})
    local p = ffi.cast("float *", t:data_ptr())
    local f32 = ffi.new("float[1]")
    for c = 0, 2 do
        local m, sd = self.mean[c + 1], self.std[c + 1]
        for y = 0, ch_ - 1 do
            for x = 0, cw - 1 do
                local v = rgb[((y + top) * w + x + left) * 3 + c]
                if self.do_rescale then f32[0] = v * self.rescale_factor; v = f32[0] end
                if self.do_normalize then v = (v - m) / sd end
                p[(c * ch_ + y) * cw + x] = v
            end
        end
    end
    return {pixel_values = t}
end

return M
