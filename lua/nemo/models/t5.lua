-- lua/nemo/models/t5.lua: the T5 text encoders as Hugging Face transformers 5.24 defines and
-- computes them (models/t5/modeling_t5.py, models/umt5/modeling_umt5.py, with the default
-- "sdpa" attention): T5EncoderModel (FLUX's text_encoder_2, google/t5-v1_1-xxl) and
-- UMT5EncoderModel (Wan's text_encoder, google/umt5-xxl). The same module tree and parameter
-- names, registered in the same order, so state_dict() lists transformers' keys in its order.
--
--   local t5 = require "nemo.models.t5"
--   local enc = t5.T5EncoderModel.from_pretrained("FLUX.1-dev/text_encoder_2", {torch_dtype = "bfloat16"})
--   local h = enc{input_ids = ids, attention_mask = mask}.last_hidden_state   -- (B, S, d_model)
--   local h2 = enc(ids).last_hidden_state                                     -- no mask
--   local umt5 = t5.UMT5EncoderModel.from_pretrained("Wan2.1-T2V-1.3B-Diffusers/text_encoder")
--
-- Parameters (no biases anywhere):
--   shared.weight (vocab, d_model), and encoder.embed_tokens.weight: the SAME tensor (tied; a
--     file may hold either key or both; with both, shared.weight is used, as transformers'
--     tie does)
--   encoder.block.{i}.layer.0.SelfAttention.{q,k,v}.weight (H*d_kv, d_model), .o.weight (d_model, H*d_kv)
--   encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight (num_buckets, H):
--     T5 in block 0 only (its bias is shared by every block); UMT5 in every block
--   encoder.block.{i}.layer.0.layer_norm.weight, encoder.block.{i}.layer.1.layer_norm.weight
--   encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight (gated) or {wi,wo} (not gated)
--   encoder.final_layer_norm.weight
--
-- The non-obvious rules (each follows transformers):
-- - T5LayerNorm is an RMS norm without mean subtraction or bias: the variance is
--   x.to(float32).pow(2).mean(-1) (float64 stays float64 here, see below), then x * rsqrt(var +
--   eps) (float32 for a 16-bit x), cast to the weight's dtype when that is bf16 / f16, then
--   weight * x.
-- - Attention has NO 1/sqrt(d_kv) scaling. The scores get the relative position bias, and
--   padding keys get finfo(dtype).min: transformers' sdpa path builds one additive float mask
--   where(mask, position_bias, finfo.min) (B, H, S, S) and calls SDPA with scale 1; so does this
--   file (F.scaled_dot_product_attention with that mask). When the mask needs a gradient (the
--   relative_attention_bias is trained) the explicit q k^T + mask, softmax, @ v path runs
--   instead (SDPA takes no gradient for its mask); both compute the same function.
-- - Relative position buckets (_relative_position_bucket, bidirectional): half the buckets for
--   keys after the query; of each half, distances below max_exact = num_buckets/4 get their own
--   bucket, larger ones max_exact + trunc(log(n / max_exact) / log(max_distance / max_exact) *
--   (num_buckets/2 - max_exact)), clamped to num_buckets/2 - 1. transformers computes that in
--   float32 with a Python-float divisor; it is computed here with the same float32 roundings
--   (checked against transformers' buckets for |distance| <= 600 in the golden case).
-- - feed_forward_proj "gated-ACT": act(wi_0(x)) * wi_1(x); "ACT": act(wi(x)); the product is cast
--   to wo.weight's dtype before wo. "gated-gelu" means gelu_new, the tanh approximation written
--   out as transformers' NewGELUActivation does (0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715
--   * x^3))), op by op, so a bf16 model rounds where transformers rounds). dense_act_fn /
--   is_gated_act present in config.json override what feed_forward_proj says (transformers
--   sets them from the file after deriving them).
-- - from_pretrained{torch_dtype = "float16"} keeps the DenseReluDense.wo weights in float32
--   (transformers' _keep_in_fp32_modules = ["wo"], applied for float16 only in 5.24): the
--   feed-forward output is then float32 and so is the residual stream from the first block on
--   (float32 + float16 promotes); each norm casts back to float16. A float16 residual stream is
--   clamped to +-(65504 or 64504 when it holds an inf) after each sub-layer, as transformers'
--   blocks do; bf16 / f32 / f64 are never clamped.
-- - A float64 model computes everything in float64, also the norm's variance that transformers
--   computes in float32 (the golden case_f64exact files were made that way).
-- - Dropout is not applied (the encoder is used in eval mode; dropout_rate is ignored).
-- Config (config.json as transformers writes it): vocab_size, d_model, d_kv, d_ff, num_layers,
-- num_heads are required; relative_attention_num_buckets (32), relative_attention_max_distance
-- (128), layer_norm_epsilon (1e-6), feed_forward_proj ("relu" for t5, "gated-gelu" for umt5)
-- default as in transformers; other keys are ignored (model_type other than the class's is a
-- warning). Not implemented: the decoder, output_hidden_states / output_attentions,
-- save_pretrained, gradient checkpointing. Both classes are in nemo.models' registry (pipelines
-- load them for text_encoder / text_encoder_2).
require "nemo"
local ffi = require "ffi"
local class = require "nemo.class"
local nn = require "nemo.nn"
local Tensor = require "nemo.tensor"
local F = require "nemo.functional"
local autograd = require "nemo.autograd"
local json = require "nemo.json"
local common = require "nemo.models.common"
local mio = require "nemo.models.io"

local free, upcast = common.free, common.upcast
local is_tensor, shape_str = Tensor.is_tensor, Tensor.shape_str
local describe = mio.describe
local null = json.null

local M = {}

-- torch.finfo(dtype).min: what padding keys get in the attention mask
M.FINFO_MIN = {float32 = -3.4028234663852886e38, float64 = -1.7976931348623157e308,
               bfloat16 = -3.3895313892515355e38, float16 = -65504.0}
local F16_MAX = 65504.0

-- ==== config ====

local function is_int(v) return type(v) == "number" and v % 1 == 0 and v > -2 ^ 53 and v < 2 ^ 53 end

-- the activations transformers' ACT2FN maps these names to (the ones implemented here)
local ACTS = {relu = true, gelu = true, gelu_new = true, gelu_pytorch_tanh = true, silu = true, swish = true}
local ACT_LIST = "relu, gelu, gelu_new, gelu_pytorch_tanh, silu, swish"

-- resolve_config(cfg, model_type, who) -> the config the model uses: the required keys checked,
-- the optional ones defaulted as transformers' T5Config / UMT5Config do, is_gated_act and
-- dense_act_fn derived from feed_forward_proj (unless the file sets them). Errors name the key.
local function resolve_config(cfg, model_type, who)
    if type(cfg) ~= "table" then error(string.format("%s: config must be a table, got %s", who, type(cfg)), 3) end
    local out = {model_type = model_type}
    local function bad(key, what, v)
        error(string.format("%s: config key '%s' must be %s, got %s", who, key, what, describe(v)), 4)
    end
    for _, key in ipairs {"vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"} do
        local v = cfg[key]
        if v == nil then error(string.format("%s: config is missing the required key '%s'", who, key), 3) end
        if not is_int(v) or v < 1 then bad(key, "a positive integer", v) end
        out[key] = v
    end
    local defaults = {relative_attention_num_buckets = 32, relative_attention_max_distance = 128}
    for key, default in pairs(defaults) do
        local v = cfg[key]
        if v == nil then v = default end
        if not is_int(v) or v < 1 then bad(key, "a positive integer", v) end
        out[key] = v
    end
    local eps = cfg.layer_norm_epsilon
    if eps == nil then eps = 1e-6 end
    if type(eps) ~= "number" or not (eps >= 0) or eps == math.huge then bad("layer_norm_epsilon", "a number >= 0", eps) end
    out.layer_norm_epsilon = eps
    local ffp = cfg.feed_forward_proj
    if ffp == nil then ffp = model_type == "umt5" and "gated-gelu" or "relu" end
    if type(ffp) ~= "string" then bad("feed_forward_proj", "a string like 'gated-gelu' or 'relu'", ffp) end
    -- T5Config.validate_architecture: "ACT" or "gated-ACT"
    local parts = {}
    for p in (ffp .. "-"):gmatch("([^-]*)-") do parts[#parts + 1] = p end
    if (#parts > 1 and parts[1] ~= "gated") or #parts > 2 then
        bad("feed_forward_proj", "of the form 'gated-ACT' or 'ACT' (e.g. 'gated-gelu', 'relu')", ffp)
    end
    out.feed_forward_proj = ffp
    out.is_gated_act = parts[1] == "gated"
    out.dense_act_fn = ffp == "gated-gelu" and "gelu_new" or parts[#parts]
    -- transformers sets the file's values after deriving them: they win
    if cfg.is_gated_act ~= nil and cfg.is_gated_act ~= null then
        if type(cfg.is_gated_act) ~= "boolean" then bad("is_gated_act", "a boolean", cfg.is_gated_act) end
        out.is_gated_act = cfg.is_gated_act
    end
    if cfg.dense_act_fn ~= nil and cfg.dense_act_fn ~= null then
        if type(cfg.dense_act_fn) ~= "string" then bad("dense_act_fn", "a string", cfg.dense_act_fn) end
        out.dense_act_fn = cfg.dense_act_fn
    end
    if not ACTS[out.dense_act_fn] then
        error(string.format("%s: activation '%s' (from config key '%s') is not supported (supported: %s)", who,
            out.dense_act_fn, cfg.dense_act_fn ~= nil and "dense_act_fn" or "feed_forward_proj", ACT_LIST), 3)
    end
    -- the bucket formula divides by log(max_distance / max_exact): both must be positive
    local max_exact = math.floor(math.floor(out.relative_attention_num_buckets / 2) / 2)
    if max_exact < 1 then
        bad("relative_attention_num_buckets", "at least 4 (a bidirectional encoder splits them in 4)",
            out.relative_attention_num_buckets)
    end
    if out.relative_attention_max_distance <= max_exact then
        error(string.format("%s: config key 'relative_attention_max_distance' (%d) must exceed num_buckets / 4 (%d)",
            who, out.relative_attention_max_distance, max_exact), 3)
    end
    local mt = cfg.model_type
    if mt ~= nil and mt ~= null and mt ~= model_type then
        io.stderr:write(string.format("warning: %s: config model_type is '%s', this class is a '%s' model\n", who,
            tostring(mt), model_type))
    end
    return out
end
M.resolve_config = resolve_config

-- ==== relative position buckets ====

local f32buf = ffi.new("float[1]")
local function f32(x) f32buf[0] = x; return f32buf[0] end

-- relative_position_bucket(rel, num_buckets, max_distance) -> bucket (0-based) of one relative
-- position rel = key - query, bidirectional: transformers' _relative_position_bucket with
-- torch's float32 roundings (rel.float() / max_exact, log, / float32(log(max_distance /
-- max_exact)), * (half - max_exact), truncated toward zero).
function M.relative_position_bucket(rel, num_buckets, max_distance)
    local half = math.floor(num_buckets / 2)
    local bucket = rel > 0 and half or 0
    local n = math.abs(rel)
    local max_exact = math.floor(half / 2)
    if n < max_exact then return bucket + n end
    local ratio = f32(f32(n) / max_exact)
    local l = f32(math.log(ratio))
    local q = f32(l / f32(math.log(max_distance / max_exact)))
    local v = f32(q * (half - max_exact))
    local large = max_exact + (v >= 0 and math.floor(v) or math.ceil(v))
    if large > half - 1 then large = half - 1 end
    return bucket + large
end

-- (S, S) int64 bucket indices, [i][j] for query i and key j (rel = j - i), on device
local function bucket_index(S, num_buckets, max_distance, device)
    local by_rel = {}
    for r = -(S - 1), S - 1 do by_rel[r] = M.relative_position_bucket(r, num_buckets, max_distance) end
    local t = Tensor.empty({S, S}, {dtype = "int64"})
    local p = ffi.cast("int64_t*", t:data_ptr())
    for i = 0, S - 1 do
        for j = 0, S - 1 do p[i * S + j] = by_rel[j - i] end
    end
    if device and device ~= "cpu" then
        local d = t:to{device = device}
        free(t)
        t = d
    end
    return t
end

-- ==== layers ====

local function factory(opts) return common.factory(opts) end

-- T5LayerNorm(hidden_size, {eps=1e-6, dtype=, device=}): weight (ones), no bias.
local T5LayerNorm = class("nemo.models.t5.T5LayerNorm", nn.Module)
M.T5LayerNorm = T5LayerNorm
function T5LayerNorm:__init(hidden_size, opts)
    nn.Module.__init(self)
    opts = opts or {}
    local fo = factory(opts)
    self.hidden_size = hidden_size
    self.variance_epsilon = opts.eps or 1e-6
    self:register_parameter("weight", Tensor.ones({hidden_size}, {dtype = fo.dtype, device = fo.device}))
end
function T5LayerNorm:forward(x)
    local xf = upcast(x)                                -- x.to(float32) (float64 stays)
    local sq = xf:square()
    if not rawequal(xf, x) then free(xf) end
    local var = sq:mean(-1, true)
    free(sq)
    local ve = var + self.variance_epsilon
    free(var)
    local r = ve:rsqrt()
    free(ve)
    local h = x * r                                     -- float32 for a 16-bit x (promotion)
    free(r)
    local w = self.weight
    if (w.dtype == "bfloat16" or w.dtype == "float16") and h.dtype ~= w.dtype then
        local hc = h:to{dtype = w.dtype}
        free(h)
        h = hc
    end
    local y = w * h
    free(h)
    return y
end
function T5LayerNorm:extra_repr() return string.format("%d, eps=%g", self.hidden_size, self.variance_epsilon) end

-- the activation named by dense_act_fn, as a function of a tensor (x is not freed)
local SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
local function activate(name, x)
    if name == "relu" then return F.relu(x) end
    if name == "silu" or name == "swish" then return F.silu(x) end
    if name == "gelu" then return F.gelu(x) end
    if name == "gelu_pytorch_tanh" then return F.gelu(x, {approximate = "tanh"}) end
    if name == "gelu_new" then
        -- 0.5 * x * (1.0 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), op by op
        local p = x:pow(3)
        local a = p * 0.044715
        free(p)
        local s = x + a
        free(a)
        local t = s * SQRT_2_OVER_PI
        free(s)
        local th = t:tanh()
        free(t)
        local u = th + 1.0
        free(th)
        local hx = x * 0.5
        local y = hx * u
        free(hx, u)
        return y
    end
    error("T5: unsupported activation '" .. tostring(name) .. "' (supported: " .. ACT_LIST .. ")", 2)
end
M.activate = activate

local function cast_to(t, dtype)
    if t.dtype == dtype then return t end
    local c = t:to{dtype = dtype}
    free(t)
    return c
end

-- T5DenseActDense(cfg, fo): wi, wo. forward: wo(act(wi(x)) cast to wo's dtype)
local T5DenseActDense = class("nemo.models.t5.T5DenseActDense", nn.Module)
M.T5DenseActDense = T5DenseActDense
function T5DenseActDense:__init(cfg, fo)
    nn.Module.__init(self)
    self.act_fn = cfg.dense_act_fn
    self.wi = nn.Linear(cfg.d_model, cfg.d_ff, {bias = false, dtype = fo.dtype, device = fo.device})
    self.wo = nn.Linear(cfg.d_ff, cfg.d_model, {bias = false, dtype = fo.dtype, device = fo.device})
end
function T5DenseActDense:forward(x)
    local h = self.wi(x)
    local a = activate(self.act_fn, h)
    free(h)
    a = cast_to(a, self.wo.weight.dtype)
    local y = self.wo(a)
    free(a)
    return y
end

-- T5DenseGatedActDense(cfg, fo): wi_0, wi_1, wo. forward: wo((act(wi_0(x)) * wi_1(x)) cast to
-- wo's dtype)
local T5DenseGatedActDense = class("nemo.models.t5.T5DenseGatedActDense", nn.Module)
M.T5DenseGatedActDense = T5DenseGatedActDense
function T5DenseGatedActDense:__init(cfg, fo)
    nn.Module.__init(self)
    self.act_fn = cfg.dense_act_fn
    self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, {bias = false, dtype = fo.dtype, device = fo.device})
    self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, {bias = false, dtype = fo.dtype, device = fo.device})
    self.wo = nn.Linear(cfg.d_ff, cfg.d_model, {bias = false, dtype = fo.dtype, device = fo.device})
end
function T5DenseGatedActDense:forward(x)
    local h0 = self.wi_0(x)
    local g = activate(self.act_fn, h0)
    free(h0)
    local l = self.wi_1(x)
    local p = g * l
    free(g, l)
    p = cast_to(p, self.wo.weight.dtype)
    local y = self.wo(p)
    free(p)
    return y
end

-- T5LayerFF(cfg, fo): DenseReluDense, layer_norm. forward: x + DenseReluDense(layer_norm(x))
local T5LayerFF = class("nemo.models.t5.T5LayerFF", nn.Module)
M.T5LayerFF = T5LayerFF
function T5LayerFF:__init(cfg, fo)
    nn.Module.__init(self)
    if cfg.is_gated_act then
        self.DenseReluDense = T5DenseGatedActDense(cfg, fo)
    else
        self.DenseReluDense = T5DenseActDense(cfg, fo)
    end
    self.layer_norm = T5LayerNorm(cfg.d_model, {eps = cfg.layer_norm_epsilon, dtype = fo.dtype, device = fo.device})
end
function T5LayerFF:forward(x)
    local n = self.layer_norm(x)
    local f = self.DenseReluDense(n)
    free(n)
    local y = x + f
    free(f)
    return y
end

-- T5Attention(cfg, has_relative_attention_bias, fo): q, k, v, o (no bias), and
-- relative_attention_bias (Embedding(num_buckets, num_heads)) when asked.
local T5Attention = class("nemo.models.t5.T5Attention", nn.Module)
M.T5Attention = T5Attention
function T5Attention:__init(cfg, has_bias, fo)
    nn.Module.__init(self)
    self.n_heads = cfg.num_heads
    self.key_value_proj_dim = cfg.d_kv
    self.inner_dim = cfg.num_heads * cfg.d_kv
    self.d_model = cfg.d_model
    self.relative_attention_num_buckets = cfg.relative_attention_num_buckets
    self.relative_attention_max_distance = cfg.relative_attention_max_distance
    self.has_relative_attention_bias = has_bias
    local lo = {bias = false, dtype = fo.dtype, device = fo.device}
    self.q = nn.Linear(cfg.d_model, self.inner_dim, lo)
    self.k = nn.Linear(cfg.d_model, self.inner_dim, lo)
    self.v = nn.Linear(cfg.d_model, self.inner_dim, lo)
    self.o = nn.Linear(self.inner_dim, cfg.d_model, lo)
    if has_bias then
        self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads,
            {dtype = fo.dtype, device = fo.device})
    end
end

-- compute_bias(idx (S, S) int64 buckets) -> (1, H, S, S) in the bias weight's dtype
function T5Attention:compute_bias(idx)
    local values = F.embedding(idx, self.relative_attention_bias.weight)   -- (S, S, H)
    local p = values:permute(2, 0, 1)
    local u = p:unsqueeze(0)
    free(values, p)
    return u
end

local function split_heads(self, y, B, S)
    local y4 = y:view(B, S, self.n_heads, self.key_value_proj_dim)
    local t = y4:transpose(1, 2)                                           -- (B, H, S, d_kv)
    free(y4)
    return t
end

-- forward(x (B, S, d_model), mask (1 or B, H, S, S) additive float) -> (B, S, d_model)
function T5Attention:forward(x, mask)
    local B, S = x.shape[1], x.shape[2]
    local q, k, v = self.q(x), self.k(x), self.v(x)
    local qh, kh, vh = split_heads(self, q, B, S), split_heads(self, k, B, S), split_heads(self, v, B, S)
    free(q, k, v)
    local o
    if mask.requires_grad and autograd.is_grad_enabled() then
        -- the explicit (eager) attention: the mask (the relative_attention_bias) gets its gradient
        local kt = kh:transpose(-1, -2)
        local scores = qh:matmul(kt)
        free(kt)
        local sm = scores + mask
        free(scores)
        local p = F.softmax(sm, -1)
        free(sm)
        o = p:matmul(vh)
        free(p)
    else
        o = F.scaled_dot_product_attention(qh, kh, vh, mask, 0, false, 1.0)
    end
    free(qh, kh, vh)
    local ot = o:transpose(1, 2)
    local of = ot:reshape(B, S, self.inner_dim)
    free(o, ot)
    local y = self.o(of)
    free(of)
    return y
end
function T5Attention:extra_repr()
    return string.format("heads=%d, d_kv=%d, relative_attention_bias=%s", self.n_heads, self.key_value_proj_dim,
        tostring(self.has_relative_attention_bias))
end

-- T5LayerSelfAttention(cfg, has_bias, fo): SelfAttention, layer_norm.
-- forward(x, mask): x + SelfAttention(layer_norm(x), mask)
local T5LayerSelfAttention = class("nemo.models.t5.T5LayerSelfAttention", nn.Module)
M.T5LayerSelfAttention = T5LayerSelfAttention
function T5LayerSelfAttention:__init(cfg, has_bias, fo)
    nn.Module.__init(self)
    self.SelfAttention = T5Attention(cfg, has_bias, fo)
    self.layer_norm = T5LayerNorm(cfg.d_model, {eps = cfg.layer_norm_epsilon, dtype = fo.dtype, device = fo.device})
end
function T5LayerSelfAttention:forward(x, mask)
    local n = self.layer_norm(x)
    local a = self.SelfAttention(n, mask)
    free(n)
    local y = x + a
    free(a)
    return y
end

-- transformers' float16 clamp after each sub-layer: +-finfo.max, or finfo.max - 1000 when the
-- tensor holds an inf (the clamp value is rounded to float16: 64512)
local function clamp_f16(h)
    if h.dtype ~= "float16" then return h end
    local a = h:abs()
    local isinf = a:eq(math.huge)
    free(a)
    local anyinf = isinf:any()
    free(isinf)
    local cv = anyinf:item() and (F16_MAX - 1000) or F16_MAX
    free(anyinf)
    local c = F.clamp(h, -cv, cv)
    free(h)
    return c
end

-- T5Block(cfg, has_bias, fo): layer = [T5LayerSelfAttention, T5LayerFF].
local T5Block = class("nemo.models.t5.T5Block", nn.Module)
M.T5Block = T5Block
function T5Block:__init(cfg, has_bias, fo)
    nn.Module.__init(self)
    self.layer = nn.ModuleList{T5LayerSelfAttention(cfg, has_bias, fo), T5LayerFF(cfg, fo)}
end
function T5Block:forward(x, mask)
    local h = clamp_f16(self.layer:get(1)(x, mask))
    local y = self.layer:get(2)(h)
    free(h)
    return clamp_f16(y)
end

-- T5Stack(cfg, embed_tokens, fo): embed_tokens (the model's `shared`, the same module),
-- block (num_layers T5Blocks), final_layer_norm. cfg.per_layer_bias: every block has its own
-- relative_attention_bias (UMT5); otherwise block 0 only, its bias used by all.
local T5Stack = class("nemo.models.t5.T5Stack", nn.Module)
M.T5Stack = T5Stack
function T5Stack:__init(cfg, embed_tokens, fo)
    nn.Module.__init(self)
    self.per_layer_bias = cfg.model_type == "umt5"
    self.num_buckets = cfg.relative_attention_num_buckets
    self.max_distance = cfg.relative_attention_max_distance
    self.embed_tokens = embed_tokens
    local blocks = {}
    for i = 1, cfg.num_layers do blocks[i] = T5Block(cfg, self.per_layer_bias or i == 1, fo) end
    self.block = nn.ModuleList(blocks)
    self.final_layer_norm = T5LayerNorm(cfg.d_model, {eps = cfg.layer_norm_epsilon, dtype = fo.dtype,
        device = fo.device})
end

-- the bucket indices for S tokens on device, cached for the last (S, device)
function T5Stack:_buckets(S, device)
    local c = rawget(self, "_bucket_cache")
    if c and c.S == S and c.device == device then return c.idx end
    local idx = bucket_index(S, self.num_buckets, self.max_distance, device)
    rawset(self, "_bucket_cache", {S = S, device = device, idx = idx})
    return idx
end

-- the attention mask of one bias: where(keep, bias, finfo.min) (B, H, S, S), or the bias
-- itself (1, H, S, S) without a padding mask
local function attention_mask(attn, idx, keep)
    local bias = attn:compute_bias(idx)
    if keep == nil then return bias end
    local m = F.where(keep, bias, M.FINFO_MIN[bias.dtype] or M.FINFO_MIN.float32)
    free(bias)
    return m
end

-- forward(inputs_embeds (B, S, d_model), keep (B, 1, 1, S) bool or nil) -> (B, S, d_model)
function T5Stack:forward(h, keep)
    local S = h.shape[2]
    local idx = self:_buckets(S, h.device)
    local mask
    local x = h
    for i, blk in self.block:iter() do
        if i == 1 or self.per_layer_bias then
            if mask then free(mask) end
            mask = attention_mask(blk.layer:get(1).SelfAttention, idx, keep)
        end
        local y = blk(x, mask)
        if not rawequal(x, h) then free(x) end
        x = y
    end
    if mask then free(mask) end
    local out = self.final_layer_norm(x)
    if not rawequal(x, h) then free(x) end
    return out
end

-- ==== the models ====

-- transformers' T5PreTrainedModel._init_weights (initializer_factor 1): normal weights with
-- these stds (the norms are ones). Skipped while from_pretrained builds a model.
local skip_init = false
local function init_weights(model, cfg)
    if skip_init then return end
    local init = nn.init
    local D, dk, H, dff = cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.d_ff
    init.normal_(model.shared.weight, 0, 1)
    for _, blk in model.encoder.block:iter() do
        local at = blk.layer:get(1).SelfAttention
        init.normal_(at.q.weight, 0, (D * dk) ^ -0.5)
        init.normal_(at.k.weight, 0, D ^ -0.5)
        init.normal_(at.v.weight, 0, D ^ -0.5)
        init.normal_(at.o.weight, 0, (H * dk) ^ -0.5)
        if at.relative_attention_bias ~= nil then init.normal_(at.relative_attention_bias.weight, 0, D ^ -0.5) end
        local ff = blk.layer:get(2).DenseReluDense
        for _, name in ipairs {"wi", "wi_0", "wi_1"} do
            if ff[name] ~= nil then init.normal_(ff[name].weight, 0, D ^ -0.5) end
        end
        init.normal_(ff.wo.weight, 0, dff ^ -0.5)
    end
end

local T5EncoderModel = class("nemo.models.T5EncoderModel", nn.Module)
M.T5EncoderModel = T5EncoderModel
T5EncoderModel.model_type = "t5"
T5EncoderModel._no_split_modules = {"T5Block"}
T5EncoderModel._keep_in_fp32_modules = {"wo"}   -- float16 loads only (see the header)
T5EncoderModel._tied_weights_keys = {["encoder.embed_tokens.weight"] = "shared.weight"}
-- a full encoder-decoder checkpoint (T5ForConditionalGeneration) loads into the encoder
T5EncoderModel._keys_to_ignore_on_load_unexpected = {"decoder.", "lm_head."}

-- T5EncoderModel(config, {dtype=, device=}): config holds transformers' config.json fields.
-- Children: shared (Embedding(vocab_size, d_model)), encoder (T5Stack, whose embed_tokens is
-- `shared`).
function T5EncoderModel:__init(config, opts)
    nn.Module.__init(self)
    local cls = getmetatable(self)
    local cfg = resolve_config(config, cls.model_type, rawget(cls, "__name") and cls.__name:match("[^.]+$") or "T5")
    local fo = factory(opts)
    self.config = cfg
    self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model, {dtype = fo.dtype, device = fo.device})
    self.encoder = T5Stack(cfg, self.shared, fo)
    init_weights(self, cfg)
end

-- The dtype of the parameters (that of shared.weight).
function T5EncoderModel:dtype() return self.shared.weight.dtype end
function T5EncoderModel:get_input_embeddings() return self.shared end

local FORWARD_KEYS = {input_ids = true, attention_mask = true, inputs_embeds = true, return_dict = true}

-- forward{input_ids=, attention_mask=, inputs_embeds=, return_dict=true}, or
-- forward(input_ids[, attention_mask | {attention_mask=, ...}]) -> {last_hidden_state = (B, S,
-- d_model)} ({h} with return_dict=false). input_ids: int64 / int32 (B, S); attention_mask: (B,
-- S), nonzero = attend (int, bool or float); inputs_embeds (B, S, d_model) instead of input_ids.
function T5EncoderModel:forward(a, b)
    local who = getmetatable(self).__name:match("[^.]+$") .. ":forward"
    local args
    if is_tensor(a) then
        args = {input_ids = a}
        if is_tensor(b) then
            args.attention_mask = b
        elseif type(b) == "table" then
            for k, v in pairs(b) do
                if k == "input_ids" then error(who .. ": input_ids given twice", 2) end
                args[k] = v
            end
        elseif b ~= nil then
            error(string.format("%s: second argument must be an attention_mask tensor or an options table, got %s",
                who, type(b)), 2)
        end
    elseif type(a) == "table" then
        args = a
    else
        error(string.format("%s: expected input_ids (a tensor) or a table {input_ids=, attention_mask=}, got %s", who,
            type(a)), 2)
    end
    for k in pairs(args) do
        if not FORWARD_KEYS[k] then
            error(string.format("%s: unknown argument '%s' (input_ids, attention_mask, inputs_embeds, return_dict)",
                who, tostring(k)), 2)
        end
    end
    local ids, am, emb = args.input_ids, args.attention_mask, args.inputs_embeds
    if (ids == nil) == (emb == nil) then error(who .. ": give exactly one of input_ids and inputs_embeds", 2) end
    local D = self.config.d_model
    local h
    if ids ~= nil then
        if not is_tensor(ids) or ids:dim() ~= 2 or (ids.dtype ~= "int64" and ids.dtype ~= "int32") then
            error(string.format("%s: input_ids must be an int64 (B, S) tensor, got %s", who,
                is_tensor(ids) and (ids.dtype .. " " .. shape_str(ids.shape)) or type(ids)), 2)
        end
        h = self.shared(ids)
    else
        if not is_tensor(emb) or emb:dim() ~= 3 or emb.shape[3] ~= D then
            error(string.format("%s: inputs_embeds must be a (B, S, %d) tensor, got %s", who, D,
                is_tensor(emb) and shape_str(emb.shape) or type(emb)), 2)
        end
        h = emb
    end
    local B, S = h.shape[1], h.shape[2]
    local keep
    if am ~= nil then
        if not is_tensor(am) or am:dim() ~= 2 or am.shape[1] ~= B or am.shape[2] ~= S then
            error(string.format("%s: attention_mask must be a (%d, %d) tensor like input_ids, got %s", who, B, S,
                is_tensor(am) and shape_str(am.shape) or type(am)), 2)
        end
        local nz = am:ne(0)
        if nz.device ~= h.device then
            local d = nz:to{device = h.device}
            free(nz)
            nz = d
        end
        keep = nz:view(B, 1, 1, S)
        free(nz)
    end
    local out = self.encoder(h, keep)
    if keep then free(keep) end
    if not rawequal(h, emb) then free(h) end
    if args.return_dict == false then return {out} end
    return {last_hidden_state = out}
end

local UMT5EncoderModel = class("nemo.models.UMT5EncoderModel", T5EncoderModel)
M.UMT5EncoderModel = UMT5EncoderModel
UMT5EncoderModel.model_type = "umt5"
UMT5EncoderModel._no_split_modules = {"UMT5Block"}

-- ==== files ====

local without_init = common.without_init

-- the tied embedding: shared.weight and encoder.embed_tokens.weight from whichever the file has
-- (shared.weight when both are there, as transformers ties embed_tokens to shared)
local function tie_embeddings(sd)
    local s, e = sd["shared.weight"], sd["encoder.embed_tokens.weight"]
    if s ~= nil then
        sd["encoder.embed_tokens.weight"] = s
    elseif e ~= nil then
        sd["shared.weight"] = e
    end
    return sd
end
M.tie_embeddings = tie_embeddings

-- whether a parameter name falls under _keep_in_fp32_modules ("wo"): one of its dot-separated
-- parts is a listed module name (transformers' rule)
function M.keep_in_fp32(name)
    for part in name:gmatch("[^%.]+") do
        if part == "wo" then return true end
    end
    return false
end

local function loader(cls, name)
    return function(folder, opts, more)
        if rawequal(folder, cls) then folder, opts = opts, more end   -- Cls:from_pretrained(...)
        return mio.load_folder(folder, opts, {class_name = name,
            build = function(cfg, dtype) return without_init(function() return cls(cfg, {dtype = dtype}) end) end,
            weights = mio.TRANSFORMERS_WEIGHTS,
            remap = tie_embeddings,
            ignore = cls._keys_to_ignore_on_load_unexpected,
            dtype_of = function(k, dtype)
                if dtype == "float16" and M.keep_in_fp32(k) then return "float32" end
                return dtype
            end})
    end
end

-- T5EncoderModel.from_pretrained(folder, {torch_dtype="float32", device="cpu", subfolder=}) /
-- UMT5EncoderModel.from_pretrained(...): reads folder/config.json and model.safetensors (or the
-- shards named by model.safetensors.index.json) and loads the weights strictly (every key,
-- none unexpected except decoder.* / lm_head.*, shapes equal), cast to torch_dtype (float16:
-- the wo weights stay float32).
T5EncoderModel.from_pretrained = loader(T5EncoderModel, "T5EncoderModel")
UMT5EncoderModel.from_pretrained = loader(UMT5EncoderModel, "UMT5EncoderModel")

return M
