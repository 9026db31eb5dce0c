-- lua/nemo/models/wan.lua: WanTransformer3DModel (Wan 2.1 / 2.2 text-to-video) as diffusers
-- defines and computes it (transformer_wan.py): the same module tree and parameter names,
-- registered in the same order (so state_dict order and a diffusers folder's keys match), the
-- same eps values, rope layout, chunk orders and float32 upcast points (../shared/spec/flux_wan.md §3).
--
--   local wan = require "nemo.models.wan"
--   local model = wan.WanTransformer3DModel.from_pretrained("path/to/transformer", {torch_dtype = "bfloat16"})
--   local out = model{hidden_states = x, timestep = t, encoder_hidden_states = e}   -- or model(x, t, e)
--   model:save_pretrained("out/transformer", {max_shard_size = "5GB"})
--   wan.count_parameters(config)      -- parameters and tensors of a config, nothing allocated
--   wan.demo_assets{...}              -- the recipes' small pipeline + synthetic video cache
--
-- The non-obvious rules:
-- - Every block norm (norm1, norm2, norm3), norm_out and all the modulation arithmetic run in
--   float32 on hidden_states.float(); the result is cast back to the model dtype before each
--   Linear. The gated residual adds after attn1 and after the FFN are float32 too, but the
--   cross-attention residual `hs + attn2(...)` stays in the model dtype.
-- - Block modulation chunks are (shift, scale, gate, c_shift, c_scale, c_gate) of
--   `scale_shift_table + tproj.float()`; the final norm's are (SHIFT, scale) of
--   `scale_shift_table + temb` (temb, not tproj): the opposite order of Flux's norm_out.
-- - q/k RMSNorm runs over the whole inner dim (across heads, weight [D]) BEFORE the head split.
-- - timestep is used raw (0..1000): no x1000, no /1000. It may be [B] or, for Wan 2.2 TI2V
--   (expand_timesteps), [B, L] with one value per latent token.
-- - Unpatchify lays the proj_out axis out as (p_t, p_h, p_w, C_out), C_out fastest, while the
--   Conv3d patch embedding's weight is [D, C_in, p_t, p_h, p_w], C_in slowest.
-- - from_pretrained{torch_dtype = "bfloat16" | "float16"} keeps diffusers' _keep_in_fp32_modules
--   (time_embedder, every scale_shift_table, norm2 weights) in float32. Unlike diffusers,
--   torch_dtype = "float64" loads everything in float64 (diffusers would keep those modules in
--   float32 even then).
-- - The rope tables are computed in float64 and rounded to float32, ALSO in a float64 model:
--   diffusers computes them once at construction into float32 buffers, and model.double() only
--   widens those (the golden case_f64exact has exactly these values). They are not buffers here
--   (diffusers' are non-persistent, so not in state_dict either): they are built for the grid a
--   call needs, cached for the last grid size, and stay float32 in a bf16 model (diffusers'
--   keep_in_fp32 "rope").
-- - Gradient checkpointing (enable_gradient_checkpointing) wraps each block call in
--   nemo.autograd.checkpoint while grad mode is on, with the same block-boundary collection as
--   Flux (model.checkpoint_collect = false turns it off); gradients are bitwise those without it.
-- - Image-to-video (image_dim and added_kv_proj_dim set, Wan 2.1 I2V; pos_embed_seq_len for
--   FLF2V): condition_embedder.image_embedder embeds encoder_hidden_states_image (the CLIP image
--   encoder's penultimate tokens), which go in front of the text tokens; each attn2 splits them
--   off again (the text is its last 512 tokens, diffusers' hard-coded length), attends to the
--   image tokens through add_k_proj / add_v_proj / norm_added_k, and adds that to the text
--   attention before to_out.
-- Shapes: hidden_states (B, C_in, F, H, W); timestep (B) or (B, L); encoder_hidden_states
-- (B, T, text_dim); output (B, C_out, F, H, W). F' H' W' = F/p_t, H/p_h, W/p_w; L = F' H' W'.
local nemo = require "nemo"
local class = require "nemo.class"
local nn = require "nemo.nn"
local Tensor = require "nemo.tensor"
local F = require "nemo.functional"
local autograd = require "nemo.autograd"
local json = require "nemo.json"
local common = require "nemo.models.common"
local cp = require "nemo.parallel.context"

local free, factory, upcast, upcast_dtype = common.free, common.factory, common.upcast, common.upcast_dtype
local is_tensor, shape_str = Tensor.is_tensor, Tensor.shape_str

local M = {}

M.DIFFUSERS_VERSION = "0.40.0.dev0"   -- written into saved config.json, as diffusers does

-- ==== helpers ====

-- free t unless it is one of the tensors that follow (inputs a function must not release)
local function drop(t, ...)
    if t == nil then return end
    for i = 1, select("#", ...) do if rawequal(t, select(i, ...)) then return end end
    free(t)
end

-- x:to(dtype), freeing x when a new tensor was made (x must be the caller's own intermediate)
local function cast_own(x, dtype)
    if x.dtype == dtype then return x end
    local y = x:to{dtype = dtype}
    free(x)
    return y
end

local function same_dtype(a, b, c) return a.dtype == b.dtype and b.dtype == c.dtype end

-- n * (1 + scale) + shift with scale and shift already broadcastable to n (Wan's chunks keep
-- their singleton axis); n is freed. n (B, L, D) with (B, 1, D) chunks of one dtype takes the
-- fused F.modulate (the same bits in float32 / float64; CPU and CUDA kernels).
local function modulate(n, scale, shift)
    if F.modulate and n:dim() == 3 and scale:dim() == 3 and scale.shape[2] == 1 and shift.shape[2] == 1 and
            same_dtype(n, scale, shift) then
        local sc, sh = scale:squeeze(1), shift:squeeze(1)
        local y = F.modulate(n, sc, sh)
        free(n, sc, sh)
        return y
    end
    local sc = 1 + scale
    local y1 = n * sc
    free(n, sc)
    local y = y1 + shift
    free(y1)
    return y
end

-- x + a * gate (diffusers writes `hidden_states.float() + attn_output * gate`): x (B, L, D), gate
-- (B, 1, D) or (B, L, D); a is freed. One dtype and a (B, 1, D) gate take the fused F.gated_add
-- (the same bits in float32 / float64); mixed dtypes (a bf16 model's bf16 a, float32 x and gate)
-- follow torch's promotion through the two ops.
local function gated_residual(x, a, gate)
    if F.gated_add and x:dim() == 3 and gate:dim() == 3 and gate.shape[2] == 1 and same_dtype(x, a, gate) then
        local g1 = gate:squeeze(1)
        local y = F.gated_add(x, g1, a)
        free(a, g1)
        return y
    end
    local g = a * gate
    free(a)
    local y = x + g
    free(g)
    return y
end

-- `table (+) t` chunked into n pieces along the chunk axis: table [1, n, D] and t [B, n, D]
-- chunk on axis 1; table [1, n, D] and t [B, L, n, D] (TI2V) chunk on axis 2, each squeezed to
-- [B, L, D]. The sum is float32 when the table is (diffusers' promotion).
local function table_chunks(tbl, t, n)
    local m
    if t:dim() == 4 then
        local tu = tbl:unsqueeze(0)
        m = tu + t
        free(tu)
        local c = m:chunk(n, 2)
        for i = 1, n do
            local s = c[i]:squeeze(2)
            free(c[i])
            c[i] = s
        end
        free(m)
        return c
    end
    m = tbl + t
    local c = m:chunk(n, 1)
    free(m)
    return c
end

-- ==== WanRotaryPosEmbed ====

-- WanRotaryPosEmbed(attention_head_dim, patch_size, max_seq_len, {theta=10000}): head dims split
-- (t, h, w) = (Dh - 2 h, h, h) with h = 2 floor(Dh / 6); each group rotates with
-- get_1d_rotary_pos_embed(dim, positions 0..max_seq_len-1). forward(hidden_states (B,C,F,H,W),
-- dtype) -> {cos, sin}, each (L, Dh) for the tokens in (f, y, x) order, f slowest.
local WanRotaryPosEmbed = class("nemo.models.WanRotaryPosEmbed", nn.Module)
M.WanRotaryPosEmbed = WanRotaryPosEmbed
function WanRotaryPosEmbed:__init(attention_head_dim, patch_size, max_seq_len, opts)
    nn.Module.__init(self)
    self.attention_head_dim = attention_head_dim
    self.patch_size = patch_size
    self.max_seq_len = max_seq_len
    self.theta = (opts and opts.theta) or 10000.0
    self.h_dim = 2 * math.floor(attention_head_dim / 6)
    self.w_dim = self.h_dim
    self.t_dim = attention_head_dim - self.h_dim - self.w_dim
    rawset(self, "_cache", nil)
end

-- rows 0..n-1 of one axis group's tables, (n, dim) each, or nil for a zero-width group
local function axis_tables(self, dim, n, dtype, device)
    if dim == 0 then return nil end
    local c, s = common.get_1d_rotary_pos_embed(dim, n, {theta = self.theta, out_dtype = "float32", device = device})
    if dtype ~= "float32" then c, s = c:to{dtype = dtype}, s:to{dtype = dtype} end
    return {c, s}
end

function WanRotaryPosEmbed:forward(hidden_states, dtype)
    local s = hidden_states.shape
    local pt, ph, pw = self.patch_size[1], self.patch_size[2], self.patch_size[3]
    local ppf, pph, ppw = math.floor(s[3] / pt), math.floor(s[4] / ph), math.floor(s[5] / pw)
    dtype = dtype or upcast_dtype(hidden_states.dtype)
    local device = hidden_states.device
    for _, v in ipairs {{"frames", ppf}, {"height", pph}, {"width", ppw}} do
        if v[2] > self.max_seq_len then
            error(string.format("WanRotaryPosEmbed: %d patches along %s exceed rope_max_seq_len (%d)", v[2], v[1],
                self.max_seq_len), 3)
        end
    end
    local key = table.concat({ppf, pph, ppw, dtype, device}, "|")
    local cache = rawget(self, "_cache")
    if cache and cache.key == key then return {cache.cos, cache.sin} end
    local Dh = self.attention_head_dim
    local L = ppf * pph * ppw
    local groups = {
        {axis_tables(self, self.t_dim, ppf, dtype, device), {ppf, 1, 1}},
        {axis_tables(self, self.h_dim, pph, dtype, device), {1, pph, 1}},
        {axis_tables(self, self.w_dim, ppw, dtype, device), {1, 1, ppw}},
    }
    local out = {}
    for which = 1, 2 do
        local parts = {}
        for _, g in ipairs(groups) do
            if g[1] then
                local t = g[1][which]
                local d = t.shape[2]
                parts[#parts + 1] = t:reshape{g[2][1], g[2][2], g[2][3], d}:expand(ppf, pph, ppw, d)
            end
        end
        out[which] = F.cat(parts, -1):reshape{L, Dh}
    end
    rawset(self, "_cache", {key = key, cos = out[1], sin = out[2]})
    return out
end
function WanRotaryPosEmbed:extra_repr()
    return string.format("attention_head_dim=%d, patch_size=%s, max_seq_len=%d (t, h, w dims %d, %d, %d)",
        self.attention_head_dim, shape_str(self.patch_size), self.max_seq_len, self.t_dim, self.h_dim, self.w_dim)
end

-- ==== WanAttention ====

-- WanAttention(dim, heads, dim_head, eps, {dtype=, device=}): to_q, to_k, to_v, to_out = [Linear,
-- Dropout(0)] (all with bias), norm_q, norm_k = RMSNorm(heads * dim_head) across heads.
local WanAttention = class("nemo.models.WanAttention", nn.Module)
M.WanAttention = WanAttention
function WanAttention:__init(dim, heads, dim_head, eps, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    self.inner_dim = dim_head * heads
    self.heads = heads
    local lin = function(i, o) return nn.Linear(i, o, {bias = true, dtype = fo.dtype, device = fo.device}) end
    self.to_q = lin(dim, self.inner_dim)
    self.to_k = lin(dim, self.inner_dim)
    self.to_v = lin(dim, self.inner_dim)
    self.to_out = nn.ModuleList{lin(self.inner_dim, dim), nn.Dropout(0.0)}
    local nopts = {eps = eps, elementwise_affine = true, dtype = fo.dtype, device = fo.device}
    self.norm_q = nn.RMSNorm(self.inner_dim, nopts)
    self.norm_k = nn.RMSNorm(self.inner_dim, nopts)
    -- image-to-video (attn2 of an I2V model): K / V of the image tokens, their K normalised
    local akv = opts and opts.added_kv_proj_dim
    if akv ~= nil then
        self.add_k_proj = lin(akv, self.inner_dim)
        self.add_v_proj = lin(akv, self.inner_dim)
        self.norm_added_k = nn.RMSNorm(self.inner_dim, nopts)
    end
end

-- (B, S, H, Dh) q, k, v -> SDPA over heads -> (B, S, H Dh) in q's dtype
-- (Ulysses attention over the cp group when the model runs context-parallel: self-attention only)
local function attend(q, k, v, cpg)
    local qt, kt, vt = q:transpose(1, 2), k:transpose(1, 2), v:transpose(1, 2)
    local o = cpg and cp.attention(qt, kt, vt, cpg) or F.scaled_dot_product_attention(qt, kt, vt)
    free(qt, kt, vt)
    local ot = o:transpose(1, 2)
    local of = ot:flatten(2, 3)
    free(o, ot)
    return cast_own(of, q.dtype)           -- hidden_states.type_as(query)
end

-- WanAttnProcessor: forward(hs (B,L,D), ehs (B,T,D) or nil (self-attention), rope {cos, sin} (L, Dh)
-- or nil) -> (B, L, D). With add_k_proj (I2V), ehs holds the image tokens first and the 512 text
-- tokens last (diffusers hard-codes 512): the query attends to each separately and the two
-- results are added.
function WanAttention:forward(hs, ehs, rope)
    local img
    if self.add_k_proj ~= nil then
        if ehs == nil or ehs.shape[2] <= 512 then
            error(string.format("WanAttention: an image-to-video cross-attention expects the image tokens followed by " ..
                "512 text tokens, got %s", ehs and shape_str(ehs.shape) or "none"), 3)
        end
        local n_img = ehs.shape[2] - 512
        img = ehs:narrow(1, 0, n_img)
        ehs = ehs:narrow(1, n_img, 512)
    end
    local kv = ehs or hs
    local q0, k0, v0 = self.to_q(hs), self.to_k(kv), self.to_v(kv)
    local qn, kn = self.norm_q(q0), self.norm_k(k0)
    free(q0, k0)
    local q, k, v = qn:unflatten(-1, {self.heads, -1}), kn:unflatten(-1, {self.heads, -1}),
        v0:unflatten(-1, {self.heads, -1})
    free(qn, kn, v0)
    if rope ~= nil then
        local qr = common.apply_rotary_emb(q, rope, {sequence_dim = 1})
        local kr = common.apply_rotary_emb(k, rope, {sequence_dim = 1})
        free(q, k)
        q, k = qr, kr
    end
    -- native backend: (B, S, H, Dh) -> (B, H, S, Dh) views, SDPA, back to (B, S, H, Dh)
    local of_img
    if img ~= nil then
        local ki0, vi0 = self.add_k_proj(img), self.add_v_proj(img)
        local kin = self.norm_added_k(ki0)
        free(ki0)
        local ki, vi = kin:unflatten(-1, {self.heads, -1}), vi0:unflatten(-1, {self.heads, -1})
        free(kin, vi0)
        of_img = attend(q, ki, vi)
        free(ki, vi)
    end
    local of = attend(q, k, v, rawget(self, "_cp_group"))
    free(k, v, q)
    if of_img ~= nil then
        local sum = of + of_img
        free(of, of_img)
        of = sum
    end
    local out = self.to_out:get(1)(of)
    free(of)
    local d = self.to_out:get(2)(out)
    if not rawequal(d, out) then free(out) end
    return d
end

-- ==== WanTimeTextImageEmbedding ====

-- WanTimeTextImageEmbedding(dim, time_freq_dim, time_proj_dim, text_embed_dim, {dtype=, device=}):
-- timesteps_proj (no params), time_embedder, act_fn, time_proj, text_embedder.
-- image_embedder (WanImageEmbedding, when image_embed_dim is given in the options).
-- forward(timestep (N), ehs (B,T,text), ts_seq_len, ehs_image (B,I,image_dim) or nil) -> temb (B,D)
-- [(B,L,D)], tproj (B,6D) [(B,L,6D)], ctx (B,T,D), image tokens (B,I,D) or nil.
-- WanImageEmbedding(in_features, out_features, pos_embed_seq_len, {dtype=, device=}): norm1
-- (FP32LayerNorm, eps 1e-5, affine), ff (FeedForward: Linear in -> in, exact GELU, Linear in ->
-- out), norm2, pos_embed (1, pos_embed_seq_len, in) when pos_embed_seq_len is set (FLF2V: the
-- tokens of two images, (B, S, in) viewed as (B/2, 2S, in), + pos_embed).
local WanImageEmbedding = class("nemo.models.WanImageEmbedding", nn.Module)
M.WanImageEmbedding = WanImageEmbedding
function WanImageEmbedding:__init(in_features, out_features, pos_embed_seq_len, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    local lo = {eps = 1e-5, elementwise_affine = true, dtype = fo.dtype, device = fo.device}
    self.norm1 = common.FP32LayerNorm(in_features, lo)
    self.ff = common.FeedForward(in_features, {dim_out = out_features, mult = 1, activation_fn = "gelu",
        dtype = fo.dtype, device = fo.device})
    self.norm2 = common.FP32LayerNorm(out_features, lo)
    if pos_embed_seq_len ~= nil then
        self:register_parameter("pos_embed", Tensor.zeros({1, pos_embed_seq_len, in_features}, fo))
    end
end
function WanImageEmbedding:forward(x)
    local h = x
    if self.pos_embed ~= nil then
        local v = x:view(-1, 2 * x.shape[2], x.shape[3])
        h = v + self.pos_embed
    end
    local n1 = self.norm1(h)
    if not rawequal(h, x) then free(h) end
    local f = self.ff(n1)
    free(n1)
    local out = self.norm2(f)
    free(f)
    return out
end

local WanTimeTextImageEmbedding = class("nemo.models.WanTimeTextImageEmbedding", nn.Module)
M.WanTimeTextImageEmbedding = WanTimeTextImageEmbedding
function WanTimeTextImageEmbedding:__init(dim, time_freq_dim, time_proj_dim, text_embed_dim, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    self.timesteps_proj = common.Timesteps(time_freq_dim, true, 0)
    self.time_embedder = common.TimestepEmbedding(time_freq_dim, dim, fo)
    self.act_fn = nn.SiLU()
    self.time_proj = nn.Linear(dim, time_proj_dim, fo)
    self.text_embedder = common.PixArtAlphaTextProjection(text_embed_dim, dim,
        {act_fn = "gelu_tanh", dtype = fo.dtype, device = fo.device})
    if opts and opts.image_embed_dim ~= nil then
        self.image_embedder = WanImageEmbedding(opts.image_embed_dim, dim, opts.pos_embed_seq_len, fo)
    end
end
function WanTimeTextImageEmbedding:forward(timestep, ehs, ts_seq_len, ehs_image)
    local tp = self.timesteps_proj(timestep)
    if ts_seq_len then
        local u = tp:unflatten(0, {-1, ts_seq_len})
        free(tp)
        tp = u
    end
    -- timestep.to(time_embedder dtype): float32 under _keep_in_fp32_modules
    tp = cast_own(tp, self.time_embedder.linear_1.weight.dtype)
    local te = self.time_embedder(tp)
    free(tp)
    local temb = cast_own(te, ehs.dtype)             -- .type_as(encoder_hidden_states)
    local a = self.act_fn(temb)
    local tproj = self.time_proj(a)
    free(a)
    local ctx = self.text_embedder(ehs)
    local img
    if ehs_image ~= nil then img = self.image_embedder(ehs_image) end
    return temb, tproj, ctx, img
end

-- ==== WanTransformerBlock ====

-- WanTransformerBlock(dim, ffn_dim, num_heads, cross_attn_norm, eps, {added_kv_proj_dim=, dtype=,
-- device=}): norm1, attn1, attn2 (with the image K/V projections when added_kv_proj_dim is set),
-- norm2 (affine FP32LayerNorm, or Identity), ffn, norm3, scale_shift_table [1,6,D].
local WanTransformerBlock = class("nemo.models.WanTransformerBlock", nn.Module)
M.WanTransformerBlock = WanTransformerBlock
function WanTransformerBlock:__init(dim, ffn_dim, num_heads, cross_attn_norm, eps, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    local dh = math.floor(dim / num_heads)
    local function ln(affine)
        return common.FP32LayerNorm(dim, {eps = eps, elementwise_affine = affine, dtype = fo.dtype, device = fo.device})
    end
    self.norm1 = ln(false)
    self.attn1 = WanAttention(dim, num_heads, dh, eps, fo)
    self.attn2 = WanAttention(dim, num_heads, dh, eps, {added_kv_proj_dim = opts and opts.added_kv_proj_dim,
        dtype = fo.dtype, device = fo.device})
    if cross_attn_norm then
        self.norm2 = ln(true)
    else
        self.norm2 = nn.Identity()
    end
    self.cross_attn_norm = cross_attn_norm
    self.ffn = common.FeedForward(dim, {inner_dim = ffn_dim, activation_fn = "gelu-approximate", dtype = fo.dtype,
        device = fo.device})
    self.norm3 = ln(false)
    local t = M._init_randn({1, 6, dim}, fo)
    self:register_parameter("scale_shift_table", t)
end

-- forward(hs (B,L,D) in the model dtype dt, ctx (B,T,D), tproj (B,6,D) or (B,L,6,D), rope) -> hs
function WanTransformerBlock:forward(hs, ctx, tproj, rope)
    local dt = hs.dtype
    local tf = upcast(tproj)
    local c = table_chunks(self.scale_shift_table, tf, 6)
    drop(tf, tproj)
    local shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = c[1], c[2], c[3], c[4], c[5], c[6]

    -- 1. self-attention: hs = (hs.float() + attn1(mod(norm1(hs.float()))) * gate).to(dt)
    local hf = upcast(hs)
    local n = cast_own(modulate(self.norm1(hf), scale_msa, shift_msa), dt)
    local a = self.attn1(n, nil, rope)
    free(n)
    local h1 = gated_residual(hf, a, gate_msa)
    drop(hf, hs)
    h1 = cast_own(h1, dt)

    -- 2. cross-attention: no modulation, no gate; the residual add stays in dt
    local n2
    if self.cross_attn_norm then
        local h1f = upcast(h1)
        n2 = cast_own(self.norm2(h1f), dt)
        drop(h1f, h1)
    else
        n2 = h1                                      -- Identity(hs.float()).type_as(hs) == hs
    end
    local a2 = self.attn2(n2, ctx, nil)
    drop(n2, h1)
    local h2 = h1 + a2
    free(h1, a2)

    -- 3. FFN: hs = (hs.float() + ffn(mod(norm3(hs.float()))).float() * c_gate).to(dt)
    local h2f = upcast(h2)
    local n3 = cast_own(modulate(self.norm3(h2f), c_scale, c_shift), dt)
    local f = self.ffn(n3)
    free(n3)
    local ff = upcast(f)
    drop(f, ff)
    local h3 = gated_residual(h2f, ff, c_gate)
    drop(h2f, h2)
    free(h2)
    for i = 1, 6 do free(c[i]) end
    return cast_own(h3, dt)
end

-- ==== config ====

local null = json.null
local function is_null(v) return v == nil or v == null end

-- diffusers' register_to_config fields of WanTransformer3DModel, in signature order.
local CONFIG = {
    {"patch_size", "ints3", {1, 2, 2}},
    {"num_attention_heads", "int", 40},
    {"attention_head_dim", "int", 128},
    {"in_channels", "int", 16},
    {"out_channels", "int?", 16},
    {"text_dim", "int", 4096},
    {"freq_dim", "int", 256},
    {"ffn_dim", "int", 13824},
    {"num_layers", "int", 40},
    {"cross_attn_norm", "bool", true},
    {"qk_norm", "string?", "rms_norm_across_heads"},
    {"eps", "number", 1e-6},
    {"image_dim", "int?", null},
    {"added_kv_proj_dim", "int?", null},
    {"rope_max_seq_len", "int", 1024},
    {"pos_embed_seq_len", "int?", null},
}
M.CONFIG_FIELDS = CONFIG

local function is_int(v) return type(v) == "number" and v % 1 == 0 and v >= 0 and v < 2^53 end

-- "ints3": the patch size, a list of 3 positive integers (numeric keys only), copied
local function ints3(v)
    local ok = type(v) == "table" and #v == 3
    if ok then for i = 1, 3 do ok = ok and is_int(v[i]) and v[i] >= 1 end end
    if ok then for k in pairs(v) do ok = ok and type(k) == "number" end end
    if not ok then return false, "a list of 3 positive integers (p_t, p_h, p_w)" end
    return true, {v[1], v[2], v[3]}
end
local function str(v)
    if type(v) == "string" then return true, v end
    return false, "a string or null"
end

-- The full config: defaults for absent keys, "_"-keys dropped, unknown keys warned about on
-- stderr, wrong types an error naming the key (common.check_config; json.null stays null; "string?"
-- is the string-or-null kind). Image-to-video keys are an error (not supported).
local function resolve_config(cfg, who)
    local out = common.check_config(CONFIG, cfg, {who = who, class = "WanTransformer3DModel", article = "a",
        level = 3, keep_null = true, kinds = {ints3 = ints3, string = str},
        what = {["int?"] = "a non-negative integer or null"}})
    for _, key in ipairs { "num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "freq_dim",
                           "ffn_dim", "rope_max_seq_len" } do
        if out[key] < 1 then
            error(string.format("%s: config key '%s' must be at least 1, got %d", who, key, out[key]), 3)
        end
    end
    if not is_null(out.out_channels) and out.out_channels < 1 then
        error(string.format("%s: config key 'out_channels' must be at least 1 or null, got %d", who,
            out.out_channels), 3)
    end
    if out.eps <= 0 then
        error(string.format("%s: config key 'eps' must be positive, got %s", who, tostring(out.eps)), 3)
    end
    if out.attention_head_dim % 2 ~= 0 then
        error(string.format("%s: attention_head_dim = %d must be even (rope rotates pairs of head dims)", who,
            out.attention_head_dim), 3)
    end
    -- image-to-video: the image embedder and the cross-attentions' image K/V come together
    if is_null(out.image_dim) ~= is_null(out.added_kv_proj_dim) then
        local function show(v) return is_null(v) and "null" or tostring(v) end
        error(string.format("%s: config keys 'image_dim' (%s) and 'added_kv_proj_dim' (%s) must be set together " ..
            "(image-to-video) or both be null", who, show(out.image_dim), show(out.added_kv_proj_dim)), 3)
    end
    for _, key in ipairs { "image_dim", "added_kv_proj_dim", "pos_embed_seq_len" } do
        if not is_null(out[key]) and out[key] < 1 then
            error(string.format("%s: config key '%s' must be at least 1 or null, got %d", who, key, out[key]), 3)
        end
    end
    if not is_null(out.pos_embed_seq_len) and is_null(out.image_dim) then
        error(string.format("%s: config key 'pos_embed_seq_len' needs image_dim (it positions image tokens)", who), 3)
    end
    local D = out.num_attention_heads * out.attention_head_dim
    if not is_null(out.added_kv_proj_dim) and out.added_kv_proj_dim ~= D then
        error(string.format("%s: config key 'added_kv_proj_dim' (%d) must equal the inner dim %d (the image " ..
            "tokens are embedded to it)", who, out.added_kv_proj_dim, D), 3)
    end
    return out
end
M.resolve_config = resolve_config

-- Parameter count of a config, computed arithmetically (no allocation): returns the number of
-- parameters and the number of tensors (= state_dict entries).
function M.count_parameters(config)
    local c = resolve_config(config, "count_parameters")
    local D = c.num_attention_heads * c.attention_head_dim
    local pt, ph, pw = c.patch_size[1], c.patch_size[2], c.patch_size[3]
    local pp = pt * ph * pw
    local cout = is_null(c.out_channels) and c.in_channels or c.out_channels
    local n, t = 0, 0
    local function lin(i, o) n = n + i * o + o; t = t + 2 end
    n = n + 2 * D; t = t + 1                                    -- scale_shift_table
    n = n + D * c.in_channels * pp + D; t = t + 2               -- patch_embedding
    lin(c.freq_dim, D); lin(D, D)                               -- time_embedder
    lin(D, 6 * D)                                               -- time_proj
    lin(c.text_dim, D); lin(D, D)                               -- text_embedder
    local i2v = not is_null(c.image_dim)
    if i2v then                                                 -- image_embedder
        n = n + 2 * c.image_dim + 2 * D; t = t + 4              -- norm1, norm2
        lin(c.image_dim, c.image_dim); lin(c.image_dim, D)      -- ff
        if not is_null(c.pos_embed_seq_len) then n = n + c.pos_embed_seq_len * c.image_dim; t = t + 1 end
    end
    for _ = 1, c.num_layers do
        n = n + 6 * D; t = t + 1                                -- scale_shift_table
        for _ = 1, 2 do                                         -- attn1, attn2
            for _ = 1, 4 do lin(D, D) end
            n = n + 2 * D; t = t + 2                            -- norm_q, norm_k
        end
        if i2v then                                             -- attn2's add_k_proj, add_v_proj, norm_added_k
            lin(c.added_kv_proj_dim, D); lin(c.added_kv_proj_dim, D)
            n = n + D; t = t + 1
        end
        if c.cross_attn_norm then n = n + 2 * D; t = t + 2 end  -- norm2
        lin(D, c.ffn_dim); lin(c.ffn_dim, D)                    -- ffn
    end
    lin(D, cout * pp)                                           -- proj_out
    return n, t
end

-- ==== the model ====

-- randn(shape) / sqrt(shape[last]) in float32, then cast (diffusers' scale_shift_table init);
-- zeros while from_pretrained builds a model whose weights are about to be replaced.
local skip_init = false
function M._init_randn(shape, fo)
    local t
    if skip_init then
        t = Tensor.empty(shape, {dtype = fo.dtype, device = fo.device})
    else
        t = Tensor.randn(shape, {dtype = "float32"}) / math.sqrt(shape[#shape])
        if (fo.dtype and fo.dtype ~= "float32") or (fo.device and fo.device ~= "cpu") then
            t = t:to{dtype = fo.dtype, device = fo.device}
        end
    end
    return t
end

local WanTransformer3DModel = class("nemo.models.WanTransformer3DModel", nn.Module)
M.WanTransformer3DModel = WanTransformer3DModel
WanTransformer3DModel._no_split_modules = {"WanTransformerBlock"}
WanTransformer3DModel._keep_in_fp32_modules = {"rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"}
WanTransformer3DModel._keys_to_ignore_on_load_unexpected = {"norm_added_q"}

-- Whether a parameter name falls under _keep_in_fp32_modules: one of its dot-separated parts is
-- a listed module name (diffusers' rule).
function M.keep_in_fp32(name)
    for part in name:gmatch("[^%.]+") do
        for _, k in ipairs(WanTransformer3DModel._keep_in_fp32_modules) do
            if part == k then return true end
        end
    end
    return false
end

-- WanTransformer3DModel(config, {dtype=, device=}): config holds diffusers' config fields.
function WanTransformer3DModel:__init(config, opts)
    nn.Module.__init(self)
    local cfg = resolve_config(config, "WanTransformer3DModel")
    local fo = factory(opts)
    self.config = cfg
    self.out_channels = is_null(cfg.out_channels) and cfg.in_channels or cfg.out_channels
    self.inner_dim = cfg.num_attention_heads * cfg.attention_head_dim
    self.gradient_checkpointing = false
    self.checkpoint_collect = true
    local D = self.inner_dim
    local p = cfg.patch_size
    self.rope = WanRotaryPosEmbed(cfg.attention_head_dim, p, cfg.rope_max_seq_len)
    self.patch_embedding = nn.Conv3d(cfg.in_channels, D, p, {stride = p, dtype = fo.dtype, device = fo.device})
    self.condition_embedder = WanTimeTextImageEmbedding(D, cfg.freq_dim, 6 * D, cfg.text_dim,
        {image_embed_dim = not is_null(cfg.image_dim) and cfg.image_dim or nil,
         pos_embed_seq_len = not is_null(cfg.pos_embed_seq_len) and cfg.pos_embed_seq_len or nil,
         dtype = fo.dtype, device = fo.device})
    local akv = not is_null(cfg.added_kv_proj_dim) and cfg.added_kv_proj_dim or nil
    local blocks = {}
    for i = 1, cfg.num_layers do
        blocks[i] = WanTransformerBlock(D, cfg.ffn_dim, cfg.num_attention_heads, cfg.cross_attn_norm, cfg.eps,
            {added_kv_proj_dim = akv, dtype = fo.dtype, device = fo.device})
    end
    self.blocks = nn.ModuleList(blocks)
    self.norm_out = common.FP32LayerNorm(D, {eps = cfg.eps, elementwise_affine = false, dtype = fo.dtype,
        device = fo.device})
    self.proj_out = nn.Linear(D, self.out_channels * p[1] * p[2] * p[3], fo)
    self:register_parameter("scale_shift_table", M._init_randn({1, 2, D}, fo))
end

function WanTransformer3DModel:enable_gradient_checkpointing() self.gradient_checkpointing = true; return self end
function WanTransformer3DModel:disable_gradient_checkpointing() self.gradient_checkpointing = false; return self end

-- The dtype of the parameters (that of patch_embedding.weight; the keep-in-fp32 ones may differ).
function WanTransformer3DModel:dtype() return self.patch_embedding.weight.dtype end

local FORWARD_ARGS = {hidden_states = true, timestep = true, encoder_hidden_states = true,
                      encoder_hidden_states_image = true, return_dict = true, attention_kwargs = true}

local function want(args, key, ndims)
    local v = args[key]
    if v == nil then error(string.format("WanTransformer3DModel:forward: %s is required", key), 4) end
    if not is_tensor(v) then
        error(string.format("WanTransformer3DModel:forward: %s must be a tensor, got %s", key, type(v)), 4)
    end
    if ndims and v:dim() ~= ndims then
        error(string.format("WanTransformer3DModel:forward: %s must have %d dimensions, got shape %s", key, ndims,
            shape_str(v.shape)), 4)
    end
    return v
end

-- timestep: a number, a 0-dim / (1) tensor (broadcast to B), a (B) tensor, or (B, L) for TI2V.
-- Returns the flat (N) tensor handed to the sinusoidal projection and L (nil for (B)).
local function timestep_of(args, B, L)
    local v = args.timestep
    if v == nil then error("WanTransformer3DModel:forward: timestep is required", 3) end
    if type(v) == "number" then return Tensor.full({B}, v, {dtype = "float32"}), nil end
    if not is_tensor(v) then
        error("WanTransformer3DModel:forward: timestep must be a tensor or a number, got " .. type(v), 3)
    end
    if v:dim() == 0 or (v:dim() == 1 and v.shape[1] == 1 and B ~= 1) then return v:reshape{1}:expand(B), nil end
    if v:dim() == 1 and v.shape[1] == B then return v, nil end
    if v:dim() == 2 and v.shape[1] == B and v.shape[2] == L then return v:reshape{B * L}, L end
    error(string.format("WanTransformer3DModel:forward: timestep must have shape (%d) (one per batch element) or " ..
        "(%d, %d) (one per latent token), got %s", B, B, L, shape_str(v.shape)), 3)
end

-- forward{hidden_states=, timestep=, encoder_hidden_states=} (attention_kwargs and return_dict are
-- accepted and ignored; diffusers uses attention_kwargs only for its LoRA scale), or positionally
-- forward(hidden_states, timestep, encoder_hidden_states) -> (B, C_out, F, H, W).
function WanTransformer3DModel:forward(args, timestep, ehs)
    if is_tensor(args) then
        args = {hidden_states = args, timestep = timestep, encoder_hidden_states = ehs}
    elseif type(args) ~= "table" then
        error("WanTransformer3DModel:forward: expected a table of named arguments " ..
            "{hidden_states=, timestep=, encoder_hidden_states=} or (hidden_states, timestep, " ..
            "encoder_hidden_states)", 2)
    end
    for k in pairs(args) do
        if not FORWARD_ARGS[k] then
            error(string.format("WanTransformer3DModel:forward: unknown argument '%s' (expected hidden_states, " ..
                "timestep, encoder_hidden_states, attention_kwargs, return_dict)", tostring(k)), 2)
        end
    end
    local cfg = self.config
    local eimg = args.encoder_hidden_states_image
    if is_null(cfg.image_dim) then
        if eimg ~= nil then
            error("WanTransformer3DModel:forward: encoder_hidden_states_image is given but this is a text-to-video " ..
                "model (config image_dim null)", 2)
        end
    else
        if not is_tensor(eimg) or eimg:dim() ~= 3 or eimg.shape[3] ~= cfg.image_dim then
            error(string.format("WanTransformer3DModel:forward: this image-to-video model needs " ..
                "encoder_hidden_states_image (B, I, %d) (the image encoder's tokens), got %s", cfg.image_dim,
                is_tensor(eimg) and shape_str(eimg.shape) or type(eimg)), 2)
        end
    end
    local x = want(args, "hidden_states", 5)
    local e = want(args, "encoder_hidden_states", 3)
    local B, Cin, Fr, Hh, Ww = x.shape[1], x.shape[2], x.shape[3], x.shape[4], x.shape[5]
    local pt, ph, pw = cfg.patch_size[1], cfg.patch_size[2], cfg.patch_size[3]
    if Cin ~= cfg.in_channels then
        error(string.format("WanTransformer3DModel:forward: hidden_states must be (B, %d, F, H, W) " ..
            "(in_channels), got %s", cfg.in_channels, shape_str(x.shape)), 2)
    end
    if Fr % pt ~= 0 or Hh % ph ~= 0 or Ww % pw ~= 0 then
        error(string.format("WanTransformer3DModel:forward: frames, height and width of hidden_states %s must be " ..
            "multiples of patch_size %s", shape_str(x.shape), shape_str(cfg.patch_size)), 2)
    end
    if e.shape[1] ~= B or e.shape[3] ~= cfg.text_dim then
        error(string.format("WanTransformer3DModel:forward: encoder_hidden_states must be (%d, T, %d) " ..
            "(text_dim), got %s", B, cfg.text_dim, shape_str(e.shape)), 2)
    end
    local Fp, Hp, Wp = Fr / pt, Hh / ph, Ww / pw
    local L = Fp * Hp * Wp
    local t, ts_len = timestep_of(args, B, L)
    -- context parallelism: this rank's slice of the patch tokens (diffusers' _cp_plan splits the
    -- first block's input, the rotary tables and a per-token timestep; the text stays whole: the
    -- cross-attention of a slice of queries needs no exchange)
    local cpg = rawget(self, "_cp_group")
    if cpg and ts_len then
        local t2 = t:reshape{B, L}
        local tl = cp.split(t2, 1, cpg, "the video's patch sequence")
        t, ts_len = tl:reshape{B * tl.shape[2]}, tl.shape[2]
        free(t2, tl)
    end

    local rope = self.rope(x, upcast_dtype(self.patch_embedding.weight.dtype))
    local cos, sin = rope[1], rope[2]
    local pe = self.patch_embedding(x)                       -- (B, D, F', H', W')
    local pf = pe:flatten(2)
    local pt_ = pf:transpose(1, 2)
    local hs = pt_:contiguous()                              -- (B, L, D), tokens (f, y, x), f slowest
    free(pe, pf)
    if not rawequal(pt_, hs) then free(pt_) end
    if cpg then
        local hl = cp.split(hs, 1, cpg, "the video's patch sequence")
        cos, sin = cp.split(cos, 0, cpg, "rope"), cp.split(sin, 0, cpg, "rope")
        free(hs)
        hs = hl
    end
    local dt = hs.dtype

    if eimg ~= nil and e.shape[2] ~= 512 then
        error(string.format("WanTransformer3DModel:forward: an image-to-video model needs encoder_hidden_states of " ..
            "512 text tokens (diffusers splits image and text tokens there), got %s", shape_str(e.shape)), 2)
    end
    local temb, tproj, ctx, img = self.condition_embedder(t, e, ts_len, eimg)
    if img ~= nil then   -- image tokens first, then the text's
        if img.shape[1] ~= B then
            error(string.format("WanTransformer3DModel:forward: encoder_hidden_states_image has %d rows after the " ..
                "image embedder, the batch is %d", img.shape[1], B), 2)
        end
        local both = F.cat({img, ctx}, 1)
        free(img, ctx)
        ctx = both
    end
    local tp6
    if ts_len then tp6 = tproj:unflatten(2, {6, -1}) else tp6 = tproj:unflatten(1, {6, -1}) end
    free(tproj)

    local ckpt = self.gradient_checkpointing and autograd.is_grad_enabled()
    for _, block in self.blocks:iter() do
        local h2
        if ckpt then
            h2 = autograd.checkpoint(function(h, c, tp, co, si)
                -- in backward's recomputation: release what the previous segment left
                if autograd.is_grad_enabled() and self.checkpoint_collect then collectgarbage() end
                return block(h, c, tp, {co, si})
            end, hs, ctx, tp6, cos, sin)
            if self.checkpoint_collect then collectgarbage() end
        else
            h2 = block(hs, ctx, tp6, {cos, sin})
        end
        free(hs)
        hs = h2
    end
    free(ctx, tp6)

    -- output norm: (shift, scale) = chunk(scale_shift_table + temb[:, None], 2) -- shift first
    local tu = temb:unsqueeze(ts_len and 2 or 1)
    local c = table_chunks(self.scale_shift_table, tu, 2)
    free(tu, temb)
    local hf = upcast(hs)
    local n = cast_own(modulate(self.norm_out(hf), c[2], c[1]), dt)
    drop(hf, hs)
    free(hs, c[1], c[2])
    local o = self.proj_out(n)
    free(n)
    if cpg then   -- every rank's tokens, in order (diffusers' ContextParallelOutput on proj_out)
        local full = cp.gather(o, 1, cpg)
        free(o, cos, sin)
        o = full
    end
    -- unpatchify: (B, L, p_t p_h p_w C_out) -> (B, C_out, F, H, W), C_out fastest in the last axis
    local o8 = o:reshape{B, Fp, Hp, Wp, pt, ph, pw, self.out_channels}
    local op = o8:permute{0, 7, 1, 4, 2, 5, 3, 6}
    local out = op:reshape{B, self.out_channels, Fr, Hh, Ww}
    free(o, o8, op)
    return out
end

-- model:enable_context_parallel(group): split the patch tokens over the ranks of `group` (a
-- nemo.dist group; nil turns it off) and run each self-attention (attn1) as Ulysses attention
-- (nemo.parallel.context); the cross-attention's queries attend the whole text locally. The output
-- is gathered, the same on every rank. The patch count and the head count must be multiples of
-- the group's size. Each rank's parameter gradients are its tokens' share: sum them over the
-- group (the FSDP2 manager with cp_size does).
function WanTransformer3DModel:enable_context_parallel(group)
    local blocks = {}
    for _, b in self.blocks:iter() do blocks[b.attn1] = true end
    cp.enable(self, group, function(m) return blocks[m] == true end)
    return self
end

-- model:enable_tensor_parallel(group): shard the layers of Automodel's Wan plan over the ranks of
-- `group` (a nemo.dist group, e.g. mesh:get_group("tp"); nemo.parallel.tensor): the condition
-- embedder's text_embedder and time_embedder (linear_1 column-, linear_2 row-parallel), time_proj
-- (column-parallel, its output gathered), every block's ffn (net.0.proj column-, net.2
-- row-parallel) and proj_out (row-parallel on its whole input); and, beyond Automodel's plan,
-- every attention by heads: to_q, to_k, to_v (add_k_proj, add_v_proj) column-parallel, the q / k
-- RMSNorms across heads split with them (one all-reduce of each token's sum of squares),
-- to_out.0 row-parallel. Automodel's plan shards time_proj and proj_out without the gather and
-- the input slice, which breaks their shapes; here they compute what the model on one process
-- computes. A one-way change: the sharded weights hold this rank's slice (each with its `_tp`
-- facts); the output, and every replicated parameter's gradient, is the one-process one on every
-- rank. opts.cp_size (the context-parallel size the model also runs with, default 1): the
-- attention is split only when the head count is a multiple of tp x cp (Ulysses gives each cp
-- rank a share of the rank's heads); otherwise it stays whole, as in Automodel's plan, and
-- model._tp_attention is false. A unit of layers split together (an
-- attention, an MLP, an embedder pair) with a LoRA adapter on one of them stays whole (Wan's LoRA
-- targets to_q / to_v: the attentions stay whole, the rest is split).
function WanTransformer3DModel:enable_tensor_parallel(group, opts)
    local tpm = require "nemo.parallel.tensor"
    if rawget(self, "_tp_group") then error("enable_tensor_parallel: the model is tensor-parallel already", 2) end
    local ce = self.condition_embedder
    local plan = {}
    -- a pair split together (or a layer) stays whole when one of its layers carries a LoRA adapter
    local function pair(a, b)
        if tpm.splittable(a, b) then plan[#plan + 1] = {a, "colwise"}; plan[#plan + 1] = {b, "rowwise"} end
    end
    pair(ce.text_embedder.linear_1, ce.text_embedder.linear_2)
    pair(ce.time_embedder.linear_1, ce.time_embedder.linear_2)
    if tpm.splittable(ce.time_proj) then plan[#plan + 1] = {ce.time_proj, "colwise", {gather_output = true}} end
    local T, H = group:size(), self.config.num_attention_heads
    local split_attn = H % (T * ((opts and opts.cp_size) or 1)) == 0
    local attns = {}
    for _, b in self.blocks:iter() do
        for _, a in ipairs { b.attn1, b.attn2 } do
            -- an attention with a LoRA adapter on one of its projections stays whole (replicated)
            if split_attn and tpm.splittable(a.to_q, a.to_k, a.to_v, a.add_k_proj, a.add_v_proj, a.to_out:get(1)) then
                for _, n in ipairs { "to_q", "to_k", "to_v", "add_k_proj", "add_v_proj" } do
                    if a[n] ~= nil then plan[#plan + 1] = {a[n], "colwise"} end
                end
                for _, n in ipairs { "norm_q", "norm_k", "norm_added_k" } do
                    if a[n] ~= nil then plan[#plan + 1] = {a[n], "rms_norm"} end
                end
                plan[#plan + 1] = {a.to_out:get(1), "rowwise"}
                attns[#attns + 1] = a
            end
        end
        pair(b.ffn.net:get(1).proj, b.ffn.net:get(3))
    end
    if tpm.splittable(self.proj_out) then plan[#plan + 1] = {self.proj_out, "rowwise", {input_is_parallel = false}} end
    return tpm.apply_model(self, plan, attns, group)
end

-- ==== files ====
-- (The folder reading and writing is nemo.models.io's, shared with FluxTransformer2DModel.)

local without_init = common.without_init

local mio = require "nemo.models.io"
M.WEIGHTS_NAME, M.WEIGHTS_INDEX_NAME = mio.WEIGHTS_NAME, mio.WEIGHTS_INDEX_NAME

-- WanTransformer3DModel.from_pretrained(folder, {torch_dtype="float32", device="cpu", subfolder=})
-- Reads folder/config.json and diffusion_pytorch_model.safetensors (or the sharded index) and
-- loads the weights strictly (every key present, none unexpected except diffusers' ignored
-- `norm_added_q`, shapes equal), cast to torch_dtype; with a 16-bit torch_dtype the
-- _keep_in_fp32_modules parameters are float32 (nemo.models.io.load_folder).
function WanTransformer3DModel.from_pretrained(folder, opts, more)
    if rawequal(folder, WanTransformer3DModel) then folder, opts = opts, more end   -- Wan:from_pretrained(...)
    return mio.load_folder(folder, opts, {class_name = "WanTransformer3DModel",
        build = function(cfg, dtype) return without_init(function() return WanTransformer3DModel(cfg, {dtype = dtype}) end) end,
        ignore = WanTransformer3DModel._keys_to_ignore_on_load_unexpected,
        dtype_of = function(k, dtype)
            if (dtype == "bfloat16" or dtype == "float16") and M.keep_in_fp32(k) then return "float32" end
            return dtype
        end})
end

-- model:save_pretrained(folder, {max_shard_size="10GB"}): config.json (with _class_name and
-- _diffusers_version, patch_size as a list, absent values null) and the weights: one
-- diffusion_pytorch_model.safetensors, or shards diffusion_pytorch_model-0000i-of-0000n.safetensors
-- plus the index when they exceed max_shard_size (split greedily in state_dict order). Weight
-- files of an earlier save that this one does not write are removed.
function WanTransformer3DModel:save_pretrained(folder, opts)
    local cfg = {_class_name = "WanTransformer3DModel", _diffusers_version = M.DIFFUSERS_VERSION}
    for k, v in pairs(self.config) do cfg[k] = v end
    cfg.patch_size = json.array{cfg.patch_size[1], cfg.patch_size[2], cfg.patch_size[3]}
    return mio.write_folder(self, folder, cfg, opts, "WanTransformer3DModel:save_pretrained")
end

-- ==== demo assets (the recipes' CPU default) ====

-- "16x16" (frames default 3) or "3x16x16" (frames x H x W latent sizes) -> frames, "HxW"
local function demo_grid(res)
    res = res or "3x16x16"
    local f, h, w = tostring(res):match("^%s*(%d+)x(%d+)x(%d+)%s*$")
    if f then return tonumber(f), h .. "x" .. w end
    if tostring(res):match("^%s*%d+x%d+%s*$") then return 3, res end
    error(string.format("demo.resolutions '%s' must be FxHxW (latent frames x height x width, e.g. 3x16x16) or HxW",
        tostring(res)), 3)
end

-- demo_assets{root=, transformer = {config}, samples=256, resolutions="3x16x16", text_len=16,
-- seed=42, log=} -> pipeline_dir, cache_dir. Writes once (cached by a hash of the options) a
-- small "pretrained" WanPipeline folder (model_index.json + transformer/ with random weights)
-- and a synthetic video-latent cache (nemo.data.synthetic, model "wan") whose latent channels
-- and text width fit the transformer, so the Wan recipes run end to end on a CPU with no download.
function M.demo_assets(opts)
    local fsm = require "nemo.fs"
    opts = opts or {}
    local tcfg = opts.transformer or {}
    local frames, hw = demo_grid(opts.resolutions)
    local samples, text_len, seed = opts.samples or 256, opts.text_len or 16, opts.seed or 42
    local log = opts.log or function() end
    local root = opts.root or ((os.getenv("XDG_CACHE_HOME") or ((os.getenv("HOME") or ".") .. "/.cache")) ..
        "/nemo-lua/demo")
    local key = json.encode(tcfg) .. "|" .. samples .. "|" .. frames .. "x" .. hw .. "|" .. text_len .. "|" .. seed
    local h = 0
    for i = 1, #key do h = (h * 31 + key:byte(i)) % 2147483647 end
    local base = string.format("%s/wan-%08x", root, h)
    local model_dir, cache_dir = base .. "/pipeline", base .. "/cache"
    if not fsm.isfile(model_dir .. "/model_index.json") then
        log(string.format("demo: creating a small Wan-architecture pipeline in %s (once)", model_dir))
        nemo.manual_seed(seed)
        local model = WanTransformer3DModel(tcfg)
        local tmp = model_dir .. ".tmp"
        if fsm.exists(tmp) then fsm.remove_tree(tmp) end
        model:save_pretrained(tmp .. "/transformer")
        json.write_file(tmp .. "/model_index.json", {_class_name = "WanPipeline",
            _diffusers_version = M.DIFFUSERS_VERSION, transformer = {"diffusers", "WanTransformer3DModel"},
            transformer_2 = {null, null},
            boundary_ratio = null, expand_timesteps = false}, {indent = 2})
        fsm.rename(tmp, model_dir)
    end
    if not fsm.isfile(cache_dir .. "/index.json") then
        log(string.format("demo: writing a synthetic video-latent cache in %s (once)", cache_dir))
        local c = resolve_config(tcfg, "demo_assets")
        require("nemo.data.synthetic").make {
            out = cache_dir, samples = samples, model = "wan", resolutions = hw, frames = frames, seed = seed,
            text_len = text_len, text_dim = c.text_dim, channels = c.in_channels, force = true,
        }
    end
    return model_dir, cache_dir
end

return M
