-- lua/nemo/models/flux.lua: FluxTransformer2DModel (FLUX.1) as diffusers defines and computes it
-- (transformer_flux.py): the same module tree and parameter names, registered in the same order
-- (so state_dict order and a diffusers folder's keys match), the same eps values, rope layout,
-- concat and chunk orders, and the same dtype handling (see ../shared/spec/flux_wan.md §2).
--
--   local flux = require "nemo.models.flux"
--   local model = flux.FluxTransformer2DModel.from_pretrained("path/to/transformer", {torch_dtype = "bfloat16"})
--   local out = model{hidden_states = x, encoder_hidden_states = e, pooled_projections = p,
--                     timestep = t, img_ids = img_ids, txt_ids = txt_ids, guidance = g}
--   model:save_pretrained("out/transformer", {max_shard_size = "5GB"})
--
-- The non-obvious rules:
-- - Sequence order is TEXT FIRST everywhere (joint attention, single blocks, rope ids); the
--   single block's channel concat is attention first, then MLP; blocks return (encoder, image).
-- - The final norm's chunk order is (scale, shift); the AdaLN-Zero layers' is (shift, scale, ...).
-- - timestep and guidance are cast to the model dtype and multiplied by 1000 in that dtype (a bf16
--   model quantises them, as diffusers does). Sinusoidal projections are float32 then cast to the
--   pooled dtype; rope tables come from float64 and are applied in float32, rounded once. In a
--   float64 model every one of those float32 steps stays float64 (common.lua's upcast).
-- - Gradient checkpointing (enable_gradient_checkpointing) wraps each block call in
--   nemo.autograd.checkpoint_owned while grad mode is on; the gradients are bitwise those without
--   it. The blocks, the ops and the checkpoint free their intermediates explicitly, so memory does
--   not wait for the garbage collector; model.checkpoint_collect = true adds a full Lua collection
--   at each block boundary (after a block's forward and before its recomputation; ~1 ms each,
--   about 1% lower peak memory).
-- - The single blocks run on the joint (text, image) sequence from block to block
--   (FluxSingleTransformerBlock:forward_joint): diffusers' split at the end of one single block
--   and concatenation at the start of the next cancel out.
-- Shapes: hidden_states (B, N, in_channels), encoder_hidden_states (B, T, joint_attention_dim),
-- pooled_projections (B, pooled_projection_dim), timestep / guidance (B), img_ids (N, 3),
-- txt_ids (T, 3); output (B, N, patch_size^2 * out_channels).
local nemo = require "nemo"
local class = require "nemo.class"
local nn = require "nemo.nn"
local Tensor = require "nemo.tensor"
local F = require "nemo.functional"
local autograd = require "nemo.autograd"
local json = require "nemo.json"
local common = require "nemo.models.common"
local cp = require "nemo.parallel.context"

local free, factory = common.free, common.factory
local is_tensor, shape_str = Tensor.is_tensor, Tensor.shape_str

local M = {}

M.DIFFUSERS_VERSION = "0.40.0.dev0"   -- written into saved config.json, as diffusers does

-- ==== FluxPosEmbed ====

-- FluxPosEmbed(theta, axes_dim): ids (S, n_axes) -> cos, sin (S, sum(axes_dim)); axis a rotates
-- its own block of head dims with get_1d_rotary_pos_embed(axes_dim[a], ids[:, a]). Tables are
-- float32 (float64 when the ids are float64: the model hands it float64 ids in a float64 model).
local FluxPosEmbed = class("nemo.models.FluxPosEmbed", nn.Module)
M.FluxPosEmbed = FluxPosEmbed
function FluxPosEmbed:__init(theta, axes_dim)
    nn.Module.__init(self)
    self.theta = theta
    self.axes_dim = axes_dim
end
function FluxPosEmbed:forward(ids)
    local n_axes = ids.shape[2]
    if n_axes ~= #self.axes_dim then
        error(string.format("FluxPosEmbed: ids have %d axes (shape %s) but axes_dims_rope has %d entries",
            n_axes, shape_str(ids.shape), #self.axes_dim), 2)
    end
    local pos = common.upcast(ids)
    local out_dtype = pos.dtype
    local cos_out, sin_out = {}, {}
    for i = 1, n_axes do
        local col = pos:select(1, i - 1)
        cos_out[i], sin_out[i] = common.get_1d_rotary_pos_embed(self.axes_dim[i], col,
            {theta = self.theta, out_dtype = out_dtype})
        free(col)
    end
    if not rawequal(pos, ids) then free(pos) end
    local c, s = F.cat(cos_out, -1), F.cat(sin_out, -1)
    free(unpack(cos_out))
    free(unpack(sin_out))
    return c, s
end
function FluxPosEmbed:extra_repr()
    return string.format("theta=%s, axes_dim=%s", tostring(self.theta), shape_str(self.axes_dim))
end

-- ==== conditioning embeddings ====

-- CombinedTimestepTextProjEmbeddings(embedding_dim, pooled_projection_dim): time_proj,
-- timestep_embedder, text_embedder. forward(timestep, pooled) -> temb (B, D).
local CombinedTimestepTextProjEmbeddings = class("nemo.models.CombinedTimestepTextProjEmbeddings", nn.Module)
M.CombinedTimestepTextProjEmbeddings = CombinedTimestepTextProjEmbeddings
function CombinedTimestepTextProjEmbeddings:__init(embedding_dim, pooled_projection_dim, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    self.time_proj = common.Timesteps(256, true, 0)
    self.timestep_embedder = common.TimestepEmbedding(256, embedding_dim, fo)
    self.text_embedder = common.PixArtAlphaTextProjection(pooled_projection_dim, embedding_dim,
        {act_fn = "silu", dtype = fo.dtype, device = fo.device})
end

local function embed_time(self, embedder, t, dtype)
    local p = self.time_proj(t)
    local pc = p:to{dtype = dtype}
    local e = embedder(pc)
    if not rawequal(pc, p) then free(pc) end
    free(p)
    return e
end

function CombinedTimestepTextProjEmbeddings:forward(timestep, pooled_projection)
    local t_emb = embed_time(self, self.timestep_embedder, timestep, pooled_projection.dtype)
    local p_emb = self.text_embedder(pooled_projection)
    local out = t_emb + p_emb
    free(t_emb, p_emb)
    return out
end

-- CombinedTimestepGuidanceTextProjEmbeddings: adds guidance_embedder (after timestep_embedder).
-- forward(timestep, guidance, pooled) -> (t_emb + g_emb) + p_emb, in that order.
local CombinedTimestepGuidanceTextProjEmbeddings =
    class("nemo.models.CombinedTimestepGuidanceTextProjEmbeddings", nn.Module)
M.CombinedTimestepGuidanceTextProjEmbeddings = CombinedTimestepGuidanceTextProjEmbeddings
function CombinedTimestepGuidanceTextProjEmbeddings:__init(embedding_dim, pooled_projection_dim, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    self.time_proj = common.Timesteps(256, true, 0)
    self.timestep_embedder = common.TimestepEmbedding(256, embedding_dim, fo)
    self.guidance_embedder = common.TimestepEmbedding(256, embedding_dim, fo)
    self.text_embedder = common.PixArtAlphaTextProjection(pooled_projection_dim, embedding_dim,
        {act_fn = "silu", dtype = fo.dtype, device = fo.device})
end
function CombinedTimestepGuidanceTextProjEmbeddings:forward(timestep, guidance, pooled_projection)
    local t_emb = embed_time(self, self.timestep_embedder, timestep, pooled_projection.dtype)
    local g_emb = embed_time(self, self.guidance_embedder, guidance, pooled_projection.dtype)
    local tg = t_emb + g_emb
    free(t_emb, g_emb)
    local p_emb = self.text_embedder(pooled_projection)
    local out = tg + p_emb
    free(tg, p_emb)
    return out
end

-- ==== attention ====

-- FluxAttention(query_dim, {heads=8, dim_head=64, bias=false, added_kv_proj_dim=, added_proj_bias=true,
-- out_bias=true, eps=1e-5, out_dim=, pre_only=false, elementwise_affine=true, dtype=, device=}).
-- Children in diffusers' order: norm_q, norm_k (RMSNorm over Dh, shared by all heads), to_q,
-- to_k, to_v, to_out = [Linear, Dropout] unless pre_only, then with added_kv_proj_dim:
-- norm_added_q, norm_added_k, add_q_proj, add_k_proj, add_v_proj, to_add_out.
local FluxAttention = class("nemo.models.FluxAttention", nn.Module)
M.FluxAttention = FluxAttention
function FluxAttention:__init(query_dim, opts)
    nn.Module.__init(self)
    opts = opts or {}
    local fo = factory(opts)
    local dim_head = opts.dim_head or 64
    local heads = opts.heads or 8
    local out_dim = opts.out_dim
    local eps = opts.eps or 1e-5
    local bias = opts.bias or false
    local out_bias = opts.out_bias ~= false
    local affine = opts.elementwise_affine ~= false
    self.head_dim = dim_head
    self.inner_dim = out_dim or dim_head * heads
    self.query_dim = query_dim
    self.out_dim = out_dim or query_dim
    self.heads = out_dim and math.floor(out_dim / dim_head) or heads
    self.pre_only = opts.pre_only or false
    self.added_kv_proj_dim = opts.added_kv_proj_dim
    local function lin(i, o, b) return nn.Linear(i, o, {bias = b, dtype = fo.dtype, device = fo.device}) end
    local function rms() return nn.RMSNorm(dim_head, {eps = eps, elementwise_affine = affine, dtype = fo.dtype,
        device = fo.device}) end
    self.norm_q = rms()
    self.norm_k = rms()
    self.to_q = lin(query_dim, self.inner_dim, bias)
    self.to_k = lin(query_dim, self.inner_dim, bias)
    self.to_v = lin(query_dim, self.inner_dim, bias)
    if not self.pre_only then
        self.to_out = nn.ModuleList{lin(self.inner_dim, self.out_dim, out_bias), nn.Dropout(opts.dropout or 0)}
    end
    if self.added_kv_proj_dim ~= nil then
        local apb = opts.added_proj_bias ~= false
        self.norm_added_q = nn.RMSNorm(dim_head, {eps = eps, dtype = fo.dtype, device = fo.device})
        self.norm_added_k = nn.RMSNorm(dim_head, {eps = eps, dtype = fo.dtype, device = fo.device})
        self.add_q_proj = lin(self.added_kv_proj_dim, self.inner_dim, apb)
        self.add_k_proj = lin(self.added_kv_proj_dim, self.inner_dim, apb)
        self.add_v_proj = lin(self.added_kv_proj_dim, self.inner_dim, apb)
        self.to_add_out = lin(self.inner_dim, query_dim, out_bias)
    end
end

-- linear projection split into heads: (B, S, D) -> (B, S, H, Dh), optionally RMS-normed
local function heads_of(self, linear, norm, x)
    local y = linear(x)
    local y4 = y:unflatten(-1, {self.heads, -1})
    if norm == nil then free(y); return y4 end
    local n = norm(y4)
    free(y, y4)
    return n
end

-- FluxAttnProcessor: forward(hs (B,N,D), ehs (B,T,D) or nil, rope {cos, sin} (T+N, Dh) or nil).
-- Double block (ehs given): returns to_out(img part), to_add_out(text part).
-- Single block (pre_only): returns the attention output (B, N, D), no output projection.
function FluxAttention:forward(hs, ehs, rope)
    local q = heads_of(self, self.to_q, self.norm_q, hs)
    local k = heads_of(self, self.to_k, self.norm_k, hs)
    local v = heads_of(self, self.to_v, nil, hs)
    local T = 0
    if ehs ~= nil and self.added_kv_proj_dim ~= nil then
        T = ehs.shape[2]
        local eq = heads_of(self, self.add_q_proj, self.norm_added_q, ehs)
        local ek = heads_of(self, self.add_k_proj, self.norm_added_k, ehs)
        local ev = heads_of(self, self.add_v_proj, nil, ehs)
        local q2, k2, v2 = F.cat({eq, q}, 1), F.cat({ek, k}, 1), F.cat({ev, v}, 1)
        free(eq, ek, ev, q, k, v)
        q, k, v = q2, k2, v2
    end
    if rope ~= nil then
        local qr = common.apply_rotary_emb(q, rope, {sequence_dim = 1})
        local kr = common.apply_rotary_emb(k, rope, {sequence_dim = 1})
        free(q, k)
        q, k = qr, kr
    end
    -- native backend: (B, S, H, Dh) -> (B, H, S, Dh) views, SDPA, back to (B, S, H, Dh)
    local qt, kt, vt = q:transpose(1, 2), k:transpose(1, 2), v:transpose(1, 2)
    local cpg = rawget(self, "_cp_group")
    local o = cpg and cp.attention(qt, kt, vt, cpg) or F.scaled_dot_product_attention(qt, kt, vt)
    free(qt, kt, vt, k, v)
    local ot = o:transpose(1, 2)
    local of = ot:flatten(2, 3)
    free(o, ot)
    if of.dtype ~= q.dtype then
        local c = of:to{dtype = q.dtype}
        free(of)
        of = c
    end
    free(q)
    if ehs == nil then return of end
    local N = of.shape[2] - T
    local parts = of:split({T, N}, 1)
    local img = self.to_out:get(1)(parts[2])
    img = self.to_out:get(2)(img)
    local txt = self.to_add_out(parts[1])
    free(of, parts[1], parts[2])
    return img, txt
end

-- ==== blocks ====

-- FluxTransformerBlock(dim, num_attention_heads, attention_head_dim, {eps=1e-6}): norm1,
-- norm1_context, attn, norm2, ff, norm2_context, ff_context.
-- forward(hs (B,N,D), ehs (B,T,D), temb (B,D), rope) -> ehs, hs (this order, as diffusers).
local FluxTransformerBlock = class("nemo.models.FluxTransformerBlock", nn.Module)
M.FluxTransformerBlock = FluxTransformerBlock
function FluxTransformerBlock:__init(dim, num_attention_heads, attention_head_dim, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    local eps = (opts and opts.eps) or 1e-6
    self.norm1 = common.AdaLayerNormZero(dim, fo)
    self.norm1_context = common.AdaLayerNormZero(dim, fo)
    self.attn = FluxAttention(dim, {added_kv_proj_dim = dim, dim_head = attention_head_dim,
        heads = num_attention_heads, out_dim = dim, bias = true, eps = eps, dtype = fo.dtype, device = fo.device})
    self.norm2 = nn.LayerNorm(dim, {elementwise_affine = false, eps = 1e-6})
    self.ff = common.FeedForward(dim, {dim_out = dim, activation_fn = "gelu-approximate", dtype = fo.dtype,
        device = fo.device})
    self.norm2_context = nn.LayerNorm(dim, {elementwise_affine = false, eps = 1e-6})
    self.ff_context = common.FeedForward(dim, {dim_out = dim, activation_fn = "gelu-approximate",
        dtype = fo.dtype, device = fo.device})
end

-- x + gate[:, None] * y (diffusers: gate.unsqueeze(1) * y, then the residual add); y is freed.
-- (B, S, D) with a (B, D) gate takes the fused op (CPU and CUDA kernels; the same bits in
-- float32 / float64).
local function gated_add(x, gate, y)
    if F.gated_add and x:dim() == 3 and gate:dim() == 2 then
        local out = F.gated_add(x, gate, y)
        free(y)
        return out
    end
    local g = gate:unsqueeze(1) * y
    free(y)
    local out = x + g
    free(g)
    return out
end

local function clip_fp16(x)
    if x.dtype ~= "float16" then return x end
    local c = x:clamp(-65504, 65504)
    free(x)
    return c
end

function FluxTransformerBlock:forward(hs, ehs, temb, rope)
    local nh, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hs, temb)
    local neh, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(ehs, temb)
    local attn_out, ctx_attn_out = self.attn(nh, neh, rope)
    free(nh, neh)
    local h1 = gated_add(hs, gate_msa, attn_out)
    local n2 = common.modulate(self.norm2(h1), scale_mlp, shift_mlp)
    local ff_out = self.ff(n2)
    free(n2)
    local h2 = gated_add(h1, gate_mlp, ff_out)
    free(h1)
    local e1 = gated_add(ehs, c_gate_msa, ctx_attn_out)
    local n2c = common.modulate(self.norm2_context(e1), c_scale_mlp, c_shift_mlp)
    local cff = self.ff_context(n2c)
    free(n2c)
    local e2 = gated_add(e1, c_gate_mlp, cff)
    free(e1)
    return clip_fp16(e2), h2
end

-- FluxSingleTransformerBlock(dim, num_attention_heads, attention_head_dim, {mlp_ratio=4}):
-- norm, proj_mlp, act_mlp, proj_out, attn (pre_only). forward(hs, ehs, temb, rope) -> ehs, hs.
local FluxSingleTransformerBlock = class("nemo.models.FluxSingleTransformerBlock", nn.Module)
M.FluxSingleTransformerBlock = FluxSingleTransformerBlock
function FluxSingleTransformerBlock:__init(dim, num_attention_heads, attention_head_dim, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    local mlp = math.floor(dim * ((opts and opts.mlp_ratio) or 4.0))
    self.mlp_hidden_dim = mlp
    self.norm = common.AdaLayerNormZeroSingle(dim, fo)
    self.proj_mlp = nn.Linear(dim, mlp, fo)
    self.act_mlp = nn.GELU{approximate = "tanh"}
    self.proj_out = nn.Linear(dim + mlp, dim, fo)
    self.attn = FluxAttention(dim, {dim_head = attention_head_dim, heads = num_attention_heads, out_dim = dim,
        bias = true, eps = 1e-6, pre_only = true, dtype = fo.dtype, device = fo.device})
end
-- The block on the joint sequence x = cat(ehs, hs) (B, T+N, D) -> the joint output (B, T+N, D);
-- x is not freed. forward() is cat, this, then the split.
function FluxSingleTransformerBlock:forward_joint(x, temb, rope)
    local nx, gate = self.norm(x, temb)
    local mp = self.proj_mlp(nx)
    local mlp = self.act_mlp(mp)
    free(mp)
    local a = self.attn(nx, nil, rope)
    free(nx)
    local y = F.cat({a, mlp}, 2)
    free(a, mlp)
    local p = self.proj_out(y)
    free(y)
    return clip_fp16(gated_add(x, gate, p))
end

function FluxSingleTransformerBlock:forward(hs, ehs, temb, rope)
    local T = ehs.shape[2]
    local x = F.cat({ehs, hs}, 1)
    local out = self:forward_joint(x, temb, rope)
    free(x)
    local L = out.shape[2]
    local eo, ho = out:narrow(1, 0, T), out:narrow(1, T, L - T)
    free(out)
    return eo, ho
end

-- ==== config ====

local null = json.null
local function is_null(v) return v == nil or v == null end

-- diffusers' register_to_config fields of FluxTransformer2DModel, in signature order.
local CONFIG = {
    {"patch_size", "int", 1},
    {"in_channels", "int", 64},
    {"out_channels", "int?", null},
    {"num_layers", "int", 19},
    {"num_single_layers", "int", 38},
    {"attention_head_dim", "int", 128},
    {"num_attention_heads", "int", 24},
    {"joint_attention_dim", "int", 4096},
    {"pooled_projection_dim", "int", 768},
    {"guidance_embeds", "bool", false},
    {"axes_dims_rope", "ints", {16, 56, 56}},
}
M.CONFIG_FIELDS = CONFIG

local function describe(v)
    if type(v) == "string" then return string.format("string %q", v) end
    if v == null then return "null" end
    return type(v) .. " " .. tostring(v)
end

local function is_int(v) return type(v) == "number" and v % 1 == 0 and v >= 0 and v < 2^53 end

-- "ints": a non-empty list of non-negative integers (numeric keys only), copied; a table that is
-- not one is shown as its list part
local function int_list(v)
    local ok = type(v) == "table" and #v > 0
    if ok then for i = 1, #v do ok = ok and is_int(v[i]) end end
    if ok then for k in pairs(v) do ok = ok and type(k) == "number" end end
    if not ok then
        if type(v) ~= "table" then return false, "a list of non-negative integers", describe(v) end
        local s = {}
        for i, x in ipairs(v) do s[i] = describe(x) end
        return false, "a list of non-negative integers", "{" .. table.concat(s, ", ") .. "}"
    end
    local c = {}
    for i, x in ipairs(v) do c[i] = x end
    return true, c
end

-- The full config: defaults for absent keys, "_"-keys dropped, unknown keys warned about on
-- stderr, wrong types an error naming the key (common.check_config). out_channels stays null when
-- not given (as diffusers' config does); the model resolves it to in_channels.
local function resolve_config(cfg, who)
    local out = common.check_config(CONFIG, cfg, {who = who, class = "FluxTransformer2DModel", article = "a",
        level = 3, describe = describe, kinds = {ints = int_list},
        what = {["int?"] = "a non-negative integer or null"}})
    for _, key in ipairs { "patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
                           "joint_attention_dim", "pooled_projection_dim" } do
        if out[key] < 1 then error(string.format("%s: config key '%s' must be at least 1, got %d", who, key, out[key]), 3) end
    end
    local sum = 0
    for i, d in ipairs(out.axes_dims_rope) do
        if d % 2 ~= 0 then
            error(string.format("%s: axes_dims_rope[%d] = %d must be even (rope rotates pairs)", who, i, d), 3)
        end
        sum = sum + d
    end
    if sum ~= out.attention_head_dim then
        error(string.format("%s: axes_dims_rope %s sums to %d but must sum to attention_head_dim (%d)", who,
            shape_str(out.axes_dims_rope), sum, out.attention_head_dim), 3)
    end
    return out
end
M.resolve_config = resolve_config

-- ==== the model ====

local FluxTransformer2DModel = class("nemo.models.FluxTransformer2DModel", nn.Module)
M.FluxTransformer2DModel = FluxTransformer2DModel
FluxTransformer2DModel._no_split_modules = {"FluxTransformerBlock", "FluxSingleTransformerBlock"}

-- FluxTransformer2DModel(config, {dtype=, device=}): config holds diffusers' config fields.
function FluxTransformer2DModel:__init(config, opts)
    nn.Module.__init(self)
    local cfg = resolve_config(config, "FluxTransformer2DModel")
    local fo = factory(opts)
    self.config = cfg
    self.out_channels = is_null(cfg.out_channels) and cfg.in_channels or cfg.out_channels
    self.inner_dim = cfg.num_attention_heads * cfg.attention_head_dim
    self.gradient_checkpointing = false
    self.checkpoint_collect = false
    local D = self.inner_dim
    self.pos_embed = FluxPosEmbed(10000, cfg.axes_dims_rope)
    local Embed = cfg.guidance_embeds and CombinedTimestepGuidanceTextProjEmbeddings or CombinedTimestepTextProjEmbeddings
    self.time_text_embed = Embed(D, cfg.pooled_projection_dim, fo)
    self.context_embedder = nn.Linear(cfg.joint_attention_dim, D, fo)
    self.x_embedder = nn.Linear(cfg.in_channels, D, fo)
    local blocks, singles = {}, {}
    for i = 1, cfg.num_layers do
        blocks[i] = FluxTransformerBlock(D, cfg.num_attention_heads, cfg.attention_head_dim, fo)
    end
    for i = 1, cfg.num_single_layers do
        singles[i] = FluxSingleTransformerBlock(D, cfg.num_attention_heads, cfg.attention_head_dim, fo)
    end
    self.transformer_blocks = nn.ModuleList(blocks)
    self.single_transformer_blocks = nn.ModuleList(singles)
    self.norm_out = common.AdaLayerNormContinuous(D, D, {elementwise_affine = false, eps = 1e-6,
        dtype = fo.dtype, device = fo.device})
    self.proj_out = nn.Linear(D, cfg.patch_size * cfg.patch_size * self.out_channels, fo)
end

function FluxTransformer2DModel:enable_gradient_checkpointing() self.gradient_checkpointing = true; return self end
function FluxTransformer2DModel:disable_gradient_checkpointing() self.gradient_checkpointing = false; return self end

-- The dtype of the parameters (that of x_embedder.weight).
function FluxTransformer2DModel:dtype() return self.x_embedder.weight.dtype end

local FORWARD_ARGS = {hidden_states = true, encoder_hidden_states = true, pooled_projections = true, timestep = true,
                      img_ids = true, txt_ids = true, guidance = true, return_dict = true,
                      joint_attention_kwargs = true}
local warned_3d_ids = false

local function want(args, key, ndims)
    local v = args[key]
    if v == nil then error(string.format("FluxTransformer2DModel:forward: %s is required", key), 4) end
    if not is_tensor(v) then
        error(string.format("FluxTransformer2DModel:forward: %s must be a tensor, got %s", key, type(v)), 4)
    end
    if ndims and v:dim() ~= ndims then
        error(string.format("FluxTransformer2DModel:forward: %s must have %d dimensions, got shape %s", key, ndims,
            shape_str(v.shape)), 4)
    end
    return v
end

-- timestep / guidance: a (B) tensor, or a number / 0-dim tensor / (1) tensor broadcast to B.
local function per_sample(args, key, B, dtype, device)
    local v = args[key]
    if type(v) == "number" then return Tensor.full({B}, v, {dtype = dtype, device = device}) end
    v = want(args, key)
    if v:dim() == 0 or (v:dim() == 1 and v.shape[1] == 1 and B ~= 1) then return v:reshape{1}:expand(B) end
    if v:dim() ~= 1 or v.shape[1] ~= B then
        error(string.format("FluxTransformer2DModel:forward: %s must have shape (%d) (one per batch element), got %s",
            key, B, shape_str(v.shape)), 3)
    end
    return v
end

local function ids_of(args, key, S, what)
    local v = want(args, key)
    if v:dim() == 3 then
        if not warned_3d_ids then
            io.stderr:write(string.format("warning: FluxTransformer2DModel: passing %s as a 3d tensor is deprecated; " ..
                "pass a 2d tensor (%s[0] is used)\n", key, key))
            warned_3d_ids = true
        end
        v = v:select(0, 0)
    end
    if v:dim() ~= 2 or v.shape[1] ~= S then
        error(string.format("FluxTransformer2DModel:forward: %s must have shape (%d, n_axes) for the %d %s tokens, got %s",
            key, S, S, what, shape_str(v.shape)), 3)
    end
    return v
end

-- forward{hidden_states=, encoder_hidden_states=, pooled_projections=, timestep=, img_ids=, txt_ids=,
-- guidance=} -> the output tensor (B, N, patch_size^2 * out_channels).
function FluxTransformer2DModel:forward(args)
    if type(args) ~= "table" or is_tensor(args) then
        error("FluxTransformer2DModel:forward: expected a table of named arguments " ..
            "{hidden_states=, encoder_hidden_states=, pooled_projections=, timestep=, img_ids=, txt_ids=, guidance=}", 2)
    end
    for k in pairs(args) do
        if not FORWARD_ARGS[k] then
            error(string.format("FluxTransformer2DModel:forward: unknown argument '%s' (controlnet and IP-adapter " ..
                "inputs are not supported)", tostring(k)), 2)
        end
    end
    local cfg = self.config
    local x = want(args, "hidden_states", 3)
    local e = want(args, "encoder_hidden_states", 3)
    local pooled = want(args, "pooled_projections", 2)
    local B, N, T = x.shape[1], x.shape[2], e.shape[2]
    if x.shape[3] ~= cfg.in_channels then
        error(string.format("FluxTransformer2DModel:forward: hidden_states must be (B, N, %d) (in_channels), got %s",
            cfg.in_channels, shape_str(x.shape)), 2)
    end
    if e.shape[1] ~= B or e.shape[3] ~= cfg.joint_attention_dim then
        error(string.format("FluxTransformer2DModel:forward: encoder_hidden_states must be (%d, T, %d) " ..
            "(joint_attention_dim), got %s", B, cfg.joint_attention_dim, shape_str(e.shape)), 2)
    end
    if pooled.shape[1] ~= B or pooled.shape[2] ~= cfg.pooled_projection_dim then
        error(string.format("FluxTransformer2DModel:forward: pooled_projections must be (%d, %d) " ..
            "(pooled_projection_dim), got %s", B, cfg.pooled_projection_dim, shape_str(pooled.shape)), 2)
    end
    if cfg.guidance_embeds and args.guidance == nil then
        error("FluxTransformer2DModel:forward: guidance is required: this model has guidance_embeds=true " ..
            "(pass guidance=, e.g. a (B) tensor filled with 3.5)", 2)
    elseif not cfg.guidance_embeds and args.guidance ~= nil then
        error("FluxTransformer2DModel:forward: this model has no guidance embedder (guidance_embeds=false); " ..
            "do not pass guidance", 2)
    end

    -- context parallelism: this rank's slice of the image and of the text tokens (diffusers' _cp_plan)
    local cpg = rawget(self, "_cp_group")
    local xl, el = x, e
    if cpg then
        xl = cp.split(x, 1, cpg, "hidden_states (the image tokens)")
        el = cp.split(e, 1, cpg, "encoder_hidden_states (the text tokens)")
    end
    local hs = self.x_embedder(xl)
    local dt = hs.dtype
    local function scaled(key)
        local v = per_sample(args, key, B, dt, x.device)
        local vc = v:to{dtype = dt}
        local s = vc * 1000
        if not rawequal(vc, v) and not rawequal(vc, args[key]) then free(vc) end
        return s
    end
    local t = scaled("timestep")
    local temb
    if cfg.guidance_embeds then
        local g = scaled("guidance")
        temb = self.time_text_embed(t, g, pooled)
        free(g)
    else
        temb = self.time_text_embed(t, pooled)
    end
    free(t)
    local ehs = self.context_embedder(el)
    if cpg then free(xl, el) end

    local txt_ids = ids_of(args, "txt_ids", T, "text")
    local img_ids = ids_of(args, "img_ids", N, "image")
    local ids_dtype = dt == "float64" and "float64" or "float32"
    if cpg then
        txt_ids, img_ids = cp.split(txt_ids, 0, cpg, "txt_ids"), cp.split(img_ids, 0, cpg, "img_ids")
        T = ehs.shape[2]
    end
    local ids = F.cat({txt_ids:to{dtype = ids_dtype}, img_ids:to{dtype = ids_dtype}}, 0)
    local cos, sin = self.pos_embed(ids)
    free(ids)
    local rope = {cos, sin}

    local ckpt = self.gradient_checkpointing and autograd.is_grad_enabled()
    local function run(list)
        for _, block in list:iter() do
            local e2, h2
            if ckpt then
                local r = autograd.checkpoint_owned(function(h, en, te, c, s)
                    -- in backward's recomputation: release what the previous segment left
                    if autograd.is_grad_enabled() and self.checkpoint_collect then collectgarbage() end
                    local eo, ho = block(h, en, te, {c, s})
                    return {eo, ho}
                end, hs, ehs, temb, cos, sin)
                e2, h2 = r[1], r[2]
                if self.checkpoint_collect then collectgarbage() end
            else
                e2, h2 = block(hs, ehs, temb, rope)
            end
            free(hs, ehs)
            hs, ehs = h2, e2
        end
    end
    run(self.transformer_blocks)
    -- The single blocks on the joint sequence: diffusers concatenates (text, image) at the start
    -- of each single block and splits the result at its end; one block's split and the next
    -- one's concatenation cancel, so the joint tensor goes from block to block (the same values
    -- and the same gradients, without two copies and a sum of sub-view gradients per block).
    -- Without single blocks diffusers drops the text stream here, so the last double block's
    -- text branch (attn.to_add_out, ff_context) gets no gradient at all rather than zeros: AdamW
    -- skips a parameter without a gradient but decays one with a zero gradient.
    if self.single_transformer_blocks:len() == 0 then
        free(ehs, cos, sin)
    else
        local x = F.cat({ehs, hs}, 1)
        free(hs, ehs)
        for _, block in self.single_transformer_blocks:iter() do
            local y
            if ckpt then
                y = autograd.checkpoint_owned(function(xx, te, c, s)
                    if autograd.is_grad_enabled() and self.checkpoint_collect then collectgarbage() end
                    return block:forward_joint(xx, te, {c, s})
                end, x, temb, cos, sin)
                if self.checkpoint_collect then collectgarbage() end
            else
                y = block:forward_joint(x, temb, rope)
            end
            free(x)
            x = y
        end
        hs = x:narrow(1, T, x.shape[2] - T)
        free(x, cos, sin)
    end

    local n = self.norm_out(hs, temb)
    free(hs, temb)
    local out = self.proj_out(n)
    free(n)
    if cpg then   -- every rank's tokens, in order (diffusers' ContextParallelOutput on proj_out)
        local full = cp.gather(out, 1, cpg)
        free(out)
        out = full
    end
    return out
end

-- model:enable_context_parallel(group): split the image and text tokens over the ranks of
-- `group` (a nemo.dist group; nil turns it off) and run every attention as Ulysses attention
-- (nemo.parallel.context). The output is gathered, the same on every rank. Sequence lengths and
-- the head count must be multiples of the group's size. Each rank's parameter gradients are
-- then its tokens' share: sum them over the group (the FSDP2 manager with cp_size does).
function FluxTransformer2DModel:enable_context_parallel(group)
    cp.enable(self, group, FluxAttention)
    return self
end

-- model:enable_tensor_parallel(group): split the largest layers over the ranks of `group` (a
-- nemo.dist group, e.g. mesh:get_group("tp"); nemo.parallel.tensor), Megatron-style. Automodel
-- has no FLUX plan (its generic plan finds none); this one is nemo-lua's:
--   every attention: to_q, to_k, to_v (and add_q/k/v_proj) column-parallel, so each rank
--     attends with num_attention_heads / T heads; norm_q / norm_k (and the added ones) act per
--     head: replicated, their gradients summed over the ranks' heads; to_out.0 and to_add_out
--     row-parallel;
--   every ff / ff_context: net.0.proj column-, net.2 row-parallel;
--   single blocks: proj_mlp column-parallel, proj_out row-parallel on cat(attention, mlp) (its
--     input columns split per part);
--   every AdaLayerNormZero(Single) linear: column-parallel, its output gathered.
-- A one-way change: the split weights hold this rank's slice (with their `_tp` facts); the output,
-- and every replicated parameter's gradient, is the one-process one on every rank. opts.cp_size
-- (the context-parallel size the model also runs with, default 1): the attentions (and the single
-- blocks, whose proj_out takes attention and MLP together) are split only when the head count is
-- a multiple of tp x cp; otherwise they stay whole and model._tp_attention is false. A unit
-- with a LoRA adapter on one of its layers (an attention, an MLP, a single block's attention and
-- MLP) stays whole, so LoRA finetuning runs with tensor parallelism.
function FluxTransformer2DModel:enable_tensor_parallel(group, opts)
    local tpm = require "nemo.parallel.tensor"
    if rawget(self, "_tp_group") then error("enable_tensor_parallel: the model is tensor-parallel already", 2) end
    local T = group:size()
    local H = self.config.num_attention_heads
    local split_attn = H % (T * ((opts and opts.cp_size) or 1)) == 0
    local plan, attns = {}, {}
    local function add(m, style, o) plan[#plan + 1] = {m, style, o} end
    -- a unit of layers split together (an attention, an MLP, a single block) stays whole when one
    -- of them carries a LoRA adapter (tensor.splittable)
    local function ff(f)
        if tpm.splittable(f.net:get(1).proj, f.net:get(3)) then
            add(f.net:get(1).proj, "colwise"); add(f.net:get(3), "rowwise")
        end
    end
    local QKV = {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}
    for _, b in self.transformer_blocks:iter() do
        add(b.norm1.linear, "colwise", {gather_output = true})
        add(b.norm1_context.linear, "colwise", {gather_output = true})
        local a = b.attn
        if split_attn and tpm.splittable(a.to_q, a.to_k, a.to_v, a.add_q_proj, a.add_k_proj, a.add_v_proj,
                                         a.to_out:get(1), a.to_add_out) then
            for _, n in ipairs(QKV) do add(a[n], "colwise") end
            for _, n in ipairs { "norm_q", "norm_k", "norm_added_q", "norm_added_k" } do add(a[n], "sum_grads") end
            add(a.to_out:get(1), "rowwise")
            add(a.to_add_out, "rowwise")
            attns[#attns + 1] = a
        end
        ff(b.ff)
        ff(b.ff_context)
    end
    for _, b in self.single_transformer_blocks:iter() do
        add(b.norm.linear, "colwise", {gather_output = true})
        local a = b.attn
        if split_attn and tpm.splittable(a.to_q, a.to_k, a.to_v, b.proj_mlp, b.proj_out) then
            for _, n in ipairs { "to_q", "to_k", "to_v" } do add(a[n], "colwise") end
            for _, n in ipairs { "norm_q", "norm_k" } do add(a[n], "sum_grads") end
            add(b.proj_mlp, "colwise")
            add(b.proj_out, "rowwise", {segments = {a.inner_dim, b.mlp_hidden_dim}})
            attns[#attns + 1] = a
        end
    end
    return tpm.apply_model(self, plan, attns, group)
end

-- ==== files ====

local without_init = common.without_init

local mio = require "nemo.models.io"
M.WEIGHTS_NAME, M.WEIGHTS_INDEX_NAME = mio.WEIGHTS_NAME, mio.WEIGHTS_INDEX_NAME

-- FluxTransformer2DModel.from_pretrained(folder, {torch_dtype="float32", device="cpu", subfolder=})
-- Reads folder/config.json and diffusion_pytorch_model.safetensors (or the sharded index) and
-- loads the weights strictly (every key present, none unexpected, shapes equal), cast to
-- torch_dtype (nemo.models.io.load_folder).
function FluxTransformer2DModel.from_pretrained(folder, opts, more)
    if rawequal(folder, FluxTransformer2DModel) then folder, opts = opts, more end   -- Flux:from_pretrained(...)
    return mio.load_folder(folder, opts, {class_name = "FluxTransformer2DModel",
        build = function(cfg, dtype) return without_init(function() return FluxTransformer2DModel(cfg, {dtype = dtype}) end) end})
end

-- model:save_pretrained(folder, {max_shard_size="10GB"}): config.json (with _class_name and
-- _diffusers_version) and the weights: one diffusion_pytorch_model.safetensors, or shards
-- diffusion_pytorch_model-0000i-of-0000n.safetensors plus the index when they exceed
-- max_shard_size (split greedily in state_dict order, as huggingface_hub does). Weight files of
-- an earlier save that this one does not write are removed.
function FluxTransformer2DModel:save_pretrained(folder, opts)
    local cfg = {_class_name = "FluxTransformer2DModel", _diffusers_version = M.DIFFUSERS_VERSION}
    for k, v in pairs(self.config) do cfg[k] = v end
    cfg.axes_dims_rope = json.array(cfg.axes_dims_rope)
    return mio.write_folder(self, folder, cfg, opts, "FluxTransformer2DModel:save_pretrained")
end

return M
