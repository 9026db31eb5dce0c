-- lua/nemo/models/common.lua: the building blocks diffusers keeps in models/embeddings.py,
-- models/normalization.py, models/attention.py and models/activations.py, shared by the Flux
-- and Wan transformers: get_timestep_embedding + Timesteps, TimestepEmbedding,
-- PixArtAlphaTextProjection, get_1d_rotary_pos_embed, apply_rotary_emb, AdaLayerNormZero,
-- AdaLayerNormZeroSingle, AdaLayerNormContinuous, FP32LayerNorm, FeedForward with diffusers'
-- GELU / GEGLU modules (the ones holding a `proj` Linear); and what the VAEs share: the config
-- check (check_config), the saved config.json (config_json), batch slicing and forward.
--
-- The non-obvious rule: every explicit float32 cast that diffusers writes (`.float()`,
-- `dtype=torch.float32`) is done here as `upcast(x)`: float32 for float32/bf16/f16 inputs, but a
-- float64 input stays float64. So a float64 model computes everything in float64 (what the
-- golden `case_f64exact` files hold), and a bf16 model rounds exactly where diffusers rounds.
--
-- Modules take a final options table {dtype=, device=} passed on to their parameters, keep
-- diffusers' child names and registration order (= state_dict order), and forward() computes
-- op for op what diffusers computes. Big intermediates are released with free() as soon as they
-- are dead: the tape keeps its own handles on what backward needs, so this only returns memory
-- that nothing uses any more (it is what makes gradient checkpointing lower the peak).
-- Shapes: B batch, S tokens, H heads, Dh head dim, D width.
require "nemo"
local class = require "nemo.class"
local nn = require "nemo.nn"
local Tensor = require "nemo.tensor"
local F = require "nemo.functional"
local json = require "nemo.json"
local mio = require "nemo.models.io"

local M = {}

-- ==== helpers ====

-- Release the engine references of dead intermediates now (see the header). Only tensors a
-- function made itself, and never one of its inputs or outputs, may be passed here.
local free = Tensor.free_all
M.free = free

-- diffusers' `.float()`: float32, except that float64 stays float64 (see the header).
-- without_init(fn): fn() with the random initialisation of Linear, Embedding, Conv2d and Conv3d
-- layers turned off (their reset_parameters do nothing), for building a model whose weights are
-- about to be loaded: what diffusers' no_init_weights() and transformers' skipped init do. The
-- classes get their reset_parameters back even when fn raises.
function M.without_init(fn)
    local nn = require "nemo.nn"
    local classes = {nn.Linear, nn.Embedding, nn.Conv2d, nn.Conv3d}
    local saved = {}
    for i, L in ipairs(classes) do
        saved[i] = rawget(L, "reset_parameters")
        L.reset_parameters = function() end
    end
    local ok, res = pcall(fn)
    for i, L in ipairs(classes) do L.reset_parameters = saved[i] end
    if not ok then error(res, 0) end
    return res
end

local function upcast_dtype(dtype) return dtype == "float64" and "float64" or "float32" end
M.upcast_dtype = upcast_dtype
local function upcast(x) return x:to{dtype = upcast_dtype(x.dtype)} end
M.upcast = upcast

local function factory(opts)
    opts = type(opts) == "table" and opts or {}
    return {dtype = opts.dtype, device = opts.device}
end
M.factory = factory

local function opt(opts, k, default)
    if type(opts) == "table" and opts[k] ~= nil then return opts[k] end
    return default
end

-- diffusers' get_activation(name) (activations.py) plus the names PixArtAlphaTextProjection
-- accepts ("gelu_tanh", "silu_fp32").
function M.get_activation(name)
    if name == "silu" or name == "swish" then return nn.SiLU() end
    if name == "gelu" then return nn.GELU() end
    if name == "gelu_tanh" or name == "gelu-approximate" then return nn.GELU{approximate = "tanh"} end
    if name == "relu" then return nn.ReLU() end
    error(string.format("get_activation: unsupported activation function '%s' (silu, swish, gelu, gelu_tanh, relu)",
        tostring(name)), 2)
end

-- ==== model configs, files and batch slicing (shared by the VAEs) ====

local null = json.null
local describe = mio.describe

local function is_int(v) return type(v) == "number" and v % 1 == 0 and v >= 0 and v < 2^53 end

-- a list whose elements pass ok_elem, copied; nil when v is not one (a table with other keys, a
-- tensor, json.null), or when it is empty and nonempty is set
local function list_of(v, ok_elem, nonempty)
    if type(v) ~= "table" or Tensor.is_tensor(v) or v == null or (nonempty and #v == 0) then return nil end
    local n = 0
    for k in pairs(v) do
        if type(k) ~= "number" then return nil end
        n = n + 1
    end
    if n ~= #v then return nil end
    local c = {}
    for i = 1, #v do
        if not ok_elem(v[i]) then return nil end
        c[i] = v[i]
    end
    return c
end

-- the list kinds: element test and what the elements are called in errors
local LIST_KINDS = {
    ints = {is_int, "non-negative integers"},
    strs = {function(x) return type(x) == "string" end, "strings"},
    bools = {function(x) return type(x) == "boolean" end, "booleans"},
    numbers = {function(x) return type(x) == "number" end, "numbers"},
}

-- check_config(fields, cfg, {who=, class=, nonempty=false, level=1}) -> the full config of a
-- model whose diffusers config fields are `fields`, a list of {key, kind, default} in signature
-- order: absent keys take the default (a table default is copied), "_"-keys are dropped, unknown
-- keys are warned about on stderr (not a `class` argument; ignored), wrong types are an error
-- "<who>: config key '<key>' must be ..." naming the key. Kinds: "int" (non-negative), "bool",
-- "str", "number" (not NaN), "size" (an int or a non-empty list of ints), the lists "ints",
-- "strs", "bools", "numbers" (empty allowed unless nonempty), and any of these with "?": json.null
-- also takes the default. level is the error level as the caller would pass it to error(); the
-- caller must not tail-call this (the levels count its frame). For the older wordings of some
-- models: describe= (how values and keys are shown; default mio.describe), what= (kind -> the
-- "must be ..." text, replacing the built-in one), kinds= (kind -> check(v) returning true and the
-- value to keep, or false, the "must be ..." text and optionally how v is shown; these take
-- precedence over the built-in kinds), keep_null=true (json.null for a "?" kind stays null
-- instead of taking the default) and article= ("an": the warning's "is not an <class> argument").
function M.check_config(fields, cfg, opts)
    local who, level = opts.who, opts.level or 1
    local describe = opts.describe or describe
    local kinds, what_of = opts.kinds or {}, opts.what or {}
    if cfg ~= nil and type(cfg) ~= "table" then
        error(string.format("%s: config must be a table, got %s", who, type(cfg)), level + 1)
    end
    cfg = cfg or {}
    local known, out, kinds_of = {}, {}, {}
    local function bad(key, what, v, shown)
        error(string.format("%s: config key '%s' must be %s, got %s", who, key, what_of[kinds_of[key]] or what,
            shown or describe(v)), level + 2)
    end
    for _, f in ipairs(fields) do
        local key, kind, default = f[1], f[2], f[3]
        known[key], kinds_of[key] = true, kind
        local nullable = kind:sub(-1) == "?"
        local base = nullable and kind:sub(1, -2) or kind
        local v = cfg[key]
        if v == null and nullable and opts.keep_null then
            v = null
        elseif v == nil or (v == null and nullable) then
            if type(default) == "table" then
                local c = {}
                for i, x in ipairs(default) do c[i] = x end
                v = c
            else
                v = default
            end
        elseif kinds[base] then
            local ok, r, shown = kinds[base](v)
            if ok then v = r else bad(key, r, v, shown) end
        elseif base == "int" then
            if not is_int(v) then bad(key, nullable and "an integer or null" or "a non-negative integer", v) end
        elseif base == "bool" then
            if type(v) ~= "boolean" then bad(key, nullable and "a boolean or null" or "a boolean", v) end
        elseif base == "str" then
            if type(v) ~= "string" then bad(key, nullable and "a string or null" or "a string", v) end
        elseif base == "number" then
            if type(v) ~= "number" or v ~= v then bad(key, nullable and "a number or null" or "a number", v) end
        elseif base == "size" then
            if not is_int(v) then
                v = list_of(v, is_int, true) or bad(key, "an integer or a list of integers", v)
            end
        elseif LIST_KINDS[base] then
            local ok_elem, what = LIST_KINDS[base][1], LIST_KINDS[base][2]
            v = list_of(v, ok_elem, opts.nonempty) or bad(key, (nullable and "a list of %s or null" or
                opts.nonempty and "a non-empty list of %s" or "a list of %s"):format(what), v)
        else
            error(string.format("check_config: field '%s' has an unknown kind '%s'", key, kind), 2)
        end
        out[key] = v
    end
    local unknown = {}
    for k in pairs(cfg) do
        if type(k) ~= "string" then
            error(string.format("%s: config keys must be strings, got %s", who, describe(k)), level + 1)
        end
        if not known[k] and k:sub(1, 1) ~= "_" then unknown[#unknown + 1] = k end
    end
    table.sort(unknown)
    for _, k in ipairs(unknown) do
        io.stderr:write(string.format("warning: %s: config key '%s' is not %s %s argument; it is ignored\n",
            who, k, opts.article or "an", opts.class))
    end
    return out
end

-- config_json(config, class_name, diffusers_version) -> what save_pretrained writes to
-- config.json: every field, with _class_name and _diffusers_version, lists (copied) as JSON
-- arrays, absent values json.null.
function M.config_json(config, class_name, diffusers_version)
    local cfg = {_class_name = class_name, _diffusers_version = diffusers_version}
    for k, v in pairs(config) do
        if type(v) == "table" and v ~= null then
            local c = {}
            for i, x in ipairs(v) do c[i] = x end
            v = json.array(c)
        end
        cfg[k] = v
    end
    return cfg
end

-- sliced(model, x, fn) -> fn(x), or with model.use_slicing and a batch of more than one,
-- fn of each sample (B = 1) concatenated over the batch: less memory, the same values.
function M.sliced(model, x, fn)
    if model.use_slicing and x.shape[1] > 1 then
        local parts, outs = x:split(1, 0), {}
        for i, p in ipairs(parts) do outs[i] = fn(p) end
        local y = F.cat(outs, 0)
        free(unpack(outs))
        return y
    end
    return fn(x)
end

-- blend(a, b, dim, extent) -> b with its first e = min(extent, |a|, |b|) slices along dim
-- faded in from a's last e: b[y] = a[|a| - e + y] (1 - y/e) + b[y] (y/e), diffusers' blend_v /
-- blend_h (which write into b; here b is replaced and freed). The weights are rounded to the
-- tiles' dtype as torch rounds a Python float multiplier; bf16 / f16 tiles blend in float32.
local function blend(a, b, dim, extent)
    local e = math.min(extent, a.shape[dim + 1], b.shape[dim + 1])
    if e <= 0 then return b end
    local wshape, wa, wb = {}, {}, {}
    for d = 1, b:dim() do wshape[d] = 1 end
    wshape[dim + 1] = e
    for y = 0, e - 1 do wa[y + 1] = 1 - y / e; wb[y + 1] = y / e end
    local cdt = upcast_dtype(b.dtype)
    local topts = {dtype = cdt, device = b.device}
    local tw_a = Tensor.tensor(wa, topts):reshape(wshape)
    local tw_b = Tensor.tensor(wb, topts):reshape(wshape)
    local ta = a:narrow(dim, a.shape[dim + 1] - e, e):to{dtype = cdt}
    local tb = b:narrow(dim, 0, e):to{dtype = cdt}
    local pa, pb = F.mul(ta, tw_a), F.mul(tb, tw_b)
    local head = F.add(pa, pb)
    free(pa, pb, tw_a, tw_b, ta, tb)   -- ta, tb: narrow views or their float32 copies
    if head.dtype ~= b.dtype then
        local h = head:to{dtype = b.dtype}
        free(head)
        head = h
    end
    local out = head
    if e < b.shape[dim + 1] then
        out = F.cat({head, b:narrow(dim, e, b.shape[dim + 1] - e)}, dim)
        free(head)
    end
    free(b)
    return out
end

-- tiled(grid, opts) -> one tensor from a grid of overlapping tiles, as diffusers' tiled_encode /
-- tiled_decode assemble theirs. grid.rows, grid.cols: the tile origins (input coordinates);
-- grid.run(r, c) -> the tile's output (fresh tensors, released here). opts: hdim, wdim (0-based
-- dims of height and width in the outputs), blend_h, blend_w (the blend extents), keep_h, keep_w
-- (what each tile keeps after blending), out_h, out_w (optional: a final crop). In diffusers'
-- order: tile (i, j) blends from the tile above, then from the one to its left, each already
-- blended itself; each then keeps its first keep_h x keep_w; rows concatenate along wdim, the
-- result along hdim. Every tile output is kept until the end, as diffusers keeps them.
function M.tiled(grid, opts)
    local rows = {}
    local ok, err = pcall(function()
        for i, r in ipairs(grid.rows) do
            local row = {}
            rows[i] = row
            for j, c in ipairs(grid.cols) do
                row[j] = grid.run(r, c)
                -- a tile's intermediates that nothing freed explicitly are garbage now: collect
                -- them before the next tile, or they pile up and undo what tiling saves
                collectgarbage()
            end
        end
    end)
    if not ok then
        for _, row in ipairs(rows) do free(unpack(row)) end
        error(err, 0)
    end
    local hd, wd = opts.hdim, opts.wdim
    for i, row in ipairs(rows) do
        for j = 1, #row do
            if i > 1 then row[j] = blend(rows[i - 1][j], row[j], hd, opts.blend_h) end
            if j > 1 then row[j] = blend(row[j - 1], row[j], wd, opts.blend_w) end
        end
    end
    local line = {}
    for i, row in ipairs(rows) do
        local parts = {}
        for j, t in ipairs(row) do
            parts[j] = t:narrow(hd, 0, math.min(opts.keep_h, t.shape[hd + 1]))
                :narrow(wd, 0, math.min(opts.keep_w, t.shape[wd + 1]))
        end
        line[i] = #parts == 1 and parts[1]:contiguous() or F.cat(parts, wd)
        free(unpack(row))
    end
    local out = #line == 1 and line[1] or F.cat(line, hd)
    if #line > 1 then free(unpack(line)) end
    local oh, ow = opts.out_h or out.shape[hd + 1], opts.out_w or out.shape[wd + 1]
    if oh < out.shape[hd + 1] or ow < out.shape[wd + 1] then
        local c = out:narrow(hd, 0, math.min(oh, out.shape[hd + 1])):narrow(wd, 0, math.min(ow, out.shape[wd + 1]))
            :contiguous()
        free(out)
        out = c
    end
    return out
end

-- origins(n, stride) -> {0, stride, 2 stride, ...} below n: Python's range(0, n, stride).
function M.origins(n, stride)
    if stride < 1 then
        error(string.format("tiling: tiles step by %s, less than one (the tile is too small for its overlap)",
            tostring(stride)), 3)
    end
    local t = {}
    for v = 0, n - 1, stride do t[#t + 1] = v end
    return t
end

-- autoencoder_forward(vae, sample, opts, class_name): what an autoencoder's forward(sample,
-- {sample_posterior=false, generator=, return_dict=true}) does: encode, take the posterior's mode
-- (or a sample), decode -> {sample = decoded} ({decoded} with return_dict=false). Its errors
-- name the caller of forward, which must not tail-call this.
function M.autoencoder_forward(vae, sample, opts, class_name)
    opts = opts or {}
    if type(opts) ~= "table" then error(class_name .. ":forward: options must be a table", 3) end
    for k in pairs(opts) do
        if k ~= "sample_posterior" and k ~= "generator" and k ~= "return_dict" then
            error(string.format("%s:forward: unknown option '%s' (sample_posterior, generator, return_dict)",
                class_name, tostring(k)), 3)
        end
    end
    local posterior = vae:encode(sample).latent_dist
    local z
    if opts.sample_posterior then z = posterior:sample(opts.generator) else z = posterior:mode() end
    local dec = vae:decode(z).sample
    if opts.return_dict == false then return {dec} end
    return {sample = dec}
end

-- ==== sinusoidal timestep embedding ====

-- get_timestep_embedding(timesteps (N), embedding_dim, {flip_sin_to_cos=false,
-- downscale_freq_shift=1, scale=1, max_period=10000}) -> (N, embedding_dim), float32 (float64
-- for float64 timesteps). The frequencies are exp(-ln(max_period) * i / (half - shift)),
-- computed in the output dtype in that op order (in float32: float32(-ln 1e4) * i, then / half,
-- then exp), as diffusers does.
function M.get_timestep_embedding(timesteps, embedding_dim, opts)
    if not Tensor.is_tensor(timesteps) or timesteps:dim() ~= 1 then
        error(string.format("get_timestep_embedding: timesteps must be a 1-D tensor, got %s",
            Tensor.is_tensor(timesteps) and Tensor.shape_str(timesteps.shape) or type(timesteps)), 2)
    end
    local flip = opt(opts, "flip_sin_to_cos", false)
    local shift = opt(opts, "downscale_freq_shift", 1)
    local scale = opt(opts, "scale", 1)
    local max_period = opt(opts, "max_period", 10000)
    local half = math.floor(embedding_dim / 2)
    local cd = upcast_dtype(timesteps.dtype)
    local exponent = Tensor.arange(0, half, 1, {dtype = cd, device = timesteps.device}) * (-math.log(max_period))
    exponent = exponent / (half - shift)
    local freqs = exponent:exp()
    local args = timesteps:to{dtype = cd}:unsqueeze(1) * freqs:unsqueeze(0)
    if scale ~= 1 then args = args * scale end
    local s, c = args:sin(), args:cos()
    local emb = flip and F.cat({c, s}, -1) or F.cat({s, c}, -1)
    if embedding_dim % 2 == 1 then
        emb = F.cat({emb, Tensor.zeros({emb.shape[1], 1}, {dtype = cd, device = emb.device})}, -1)
    end
    return emb
end

-- Timesteps(num_channels, flip_sin_to_cos, downscale_freq_shift, {scale=1}): no parameters.
local Timesteps = class("nemo.models.Timesteps", nn.Module)
M.Timesteps = Timesteps
function Timesteps:__init(num_channels, flip_sin_to_cos, downscale_freq_shift, opts)
    nn.Module.__init(self)
    self.num_channels = num_channels
    self.flip_sin_to_cos = flip_sin_to_cos
    self.downscale_freq_shift = downscale_freq_shift
    self.scale = opt(opts, "scale", 1)
end
function Timesteps:forward(timesteps)
    return M.get_timestep_embedding(timesteps, self.num_channels, {flip_sin_to_cos = self.flip_sin_to_cos,
        downscale_freq_shift = self.downscale_freq_shift, scale = self.scale})
end
function Timesteps:extra_repr()
    return string.format("num_channels=%d, flip_sin_to_cos=%s, downscale_freq_shift=%s", self.num_channels,
        tostring(self.flip_sin_to_cos), tostring(self.downscale_freq_shift))
end

-- TimestepEmbedding(in_channels, time_embed_dim, {act_fn="silu", out_dim=, sample_proj_bias=true,
-- dtype=, device=}): linear_1 -> act -> linear_2.
local TimestepEmbedding = class("nemo.models.TimestepEmbedding", nn.Module)
M.TimestepEmbedding = TimestepEmbedding
function TimestepEmbedding:__init(in_channels, time_embed_dim, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    local bias = opt(opts, "sample_proj_bias", true)
    self.linear_1 = nn.Linear(in_channels, time_embed_dim, {bias = bias, dtype = fo.dtype, device = fo.device})
    self.act = M.get_activation(opt(opts, "act_fn", "silu"))
    self.linear_2 = nn.Linear(time_embed_dim, opt(opts, "out_dim", time_embed_dim),
        {bias = bias, dtype = fo.dtype, device = fo.device})
end
function TimestepEmbedding:forward(sample)
    local h = self.linear_1(sample)
    local a = self.act(h)
    free(h)
    local out = self.linear_2(a)
    free(a)
    return out
end

-- PixArtAlphaTextProjection(in_features, hidden_size, {out_features=, act_fn="gelu_tanh",
-- dtype=, device=}): linear_1 -> act_1 -> linear_2.
local PixArtAlphaTextProjection = class("nemo.models.PixArtAlphaTextProjection", nn.Module)
M.PixArtAlphaTextProjection = PixArtAlphaTextProjection
function PixArtAlphaTextProjection:__init(in_features, hidden_size, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    self.linear_1 = nn.Linear(in_features, hidden_size, fo)
    self.act_1 = M.get_activation(opt(opts, "act_fn", "gelu_tanh"))
    self.linear_2 = nn.Linear(hidden_size, opt(opts, "out_features", hidden_size), fo)
end
function PixArtAlphaTextProjection:forward(caption)
    local h = self.linear_1(caption)
    local a = self.act_1(h)
    free(h)
    local out = self.linear_2(a)
    free(a)
    return out
end

-- ==== rotary position embedding ====

-- get_1d_rotary_pos_embed(dim, pos, {theta=10000, linear_factor=1, ntk_factor=1,
-- out_dtype="float32"}) -> cos, sin, each (S, dim), the use_real=True,
-- repeat_interleave_real=True form: column 2i and 2i+1 both hold cos(pos * f_i) with
-- f_i = 1 / theta^(2i/dim). pos is a (S) tensor or an integer S (positions 0..S-1). Computed in
-- float64 (freqs_dtype=float64) and rounded once to out_dtype (diffusers' final `.float()`).
function M.get_1d_rotary_pos_embed(dim, pos, opts)
    if type(dim) ~= "number" or dim % 2 ~= 0 or dim <= 0 then
        error("get_1d_rotary_pos_embed: dim must be a positive even integer, got " .. tostring(dim), 2)
    end
    local theta = opt(opts, "theta", 10000) * opt(opts, "ntk_factor", 1)
    local linear_factor = opt(opts, "linear_factor", 1)
    local out_dtype = opt(opts, "out_dtype", "float32")
    local device = opt(opts, "device", nil)
    if type(pos) == "number" then pos = Tensor.arange(0, pos, 1, {dtype = "float64", device = device}) end
    device = device or pos.device
    local half = dim / 2
    local f = {}
    for i = 0, half - 1 do f[i + 1] = 1.0 / (theta ^ ((2 * i) / dim)) / linear_factor end
    local freqs = Tensor.tensor(f, {dtype = "float64", device = device})
    local p64 = pos:to{dtype = "float64"}
    local pu, fu = p64:unsqueeze(1), freqs:unsqueeze(0)
    local ang = pu * fu                                                          -- (S, half)
    free(pu, fu, freqs)
    if not rawequal(p64, pos) then free(p64) end
    local S = ang.shape[1]
    local function interleave(t)
        local u = t:unsqueeze(2)
        local e = u:expand(S, half, 2)
        local r = e:reshape(S, dim)
        local o = r:to{dtype = out_dtype}
        free(t, u, e)
        if not rawequal(o, r) then free(r) end
        return o
    end
    local c, s = interleave(ang:cos()), interleave(ang:sin())
    free(ang)
    return c, s
end

-- apply_rotary_emb(x, {cos, sin}, {sequence_dim=2}): x is (B, H, S, Dh) (sequence_dim 2) or
-- (B, S, H, Dh) (sequence_dim 1); cos/sin (S, Dh) in the interleaved layout above. Pairs
-- (2i, 2i+1) rotate: out[2i] = x[2i] c - x[2i+1] s, out[2i+1] = x[2i+1] c + x[2i] s, computed
-- in float32 (float64 for float64 x) and rounded once to x's dtype. The same products and
-- sums as diffusers' x.float()*cos + x_rotated.float()*sin (negation is exact), so float32
-- results are bitwise equal; only one of each duplicated table column is read. On the CPU this
-- is one fused op (F.rope: one pass, one fused backward; CPU and CUDA kernels), which reads every
-- column, same bits.
function M.apply_rotary_emb(x, freqs, opts)
    local sequence_dim = opt(opts, "sequence_dim", 2)
    local cos, sin = freqs[1], freqs[2]
    local nd = x:dim()
    local Dh = x.shape[nd]
    local S = x.shape[sequence_dim + 1]
    if cos:dim() ~= 2 or cos.shape[1] ~= S or cos.shape[2] ~= Dh then
        error(string.format("apply_rotary_emb: rope tables %s do not fit x %s (sequence_dim %d): expected (%d, %d)",
            Tensor.shape_str(cos.shape), Tensor.shape_str(x.shape), sequence_dim, S, Dh), 2)
    end
    if F.rope and not (cos.requires_grad or sin.requires_grad) then
        -- the fused op: one pass, the same bits as the sequence below (float32 / float64)
        return F.rope(x, cos, sin, sequence_dim)
    end
    local c = cos:slice(1, 0, nil, 2)          -- (S, Dh/2): one of each pair
    local s = sin:slice(1, 0, nil, 2)
    if sequence_dim == 1 then                  -- (S, 1, Dh/2)
        local c1, s1 = c:unsqueeze(1), s:unsqueeze(1)
        free(c, s)
        c, s = c1, s1
    end
    local xf = upcast(x)
    local xp = xf:unflatten(-1, {-1, 2})
    local x0, x1 = xp:select(-1, 0), xp:select(-1, 1)
    local a, b = x0 * c, x1 * s
    local o0 = a - b
    free(a, b)
    a, b = x1 * c, x0 * s
    local o1 = a + b
    free(a, b, x0, x1, xp, c, s)
    if not rawequal(xf, x) then free(xf) end
    -- interleave back: (..., Dh/2, 2) -> (..., Dh)
    local u0, u1 = o0:unsqueeze(-1), o1:unsqueeze(-1)
    local st = F.cat({u0, u1}, -1)
    free(u0, u1, o0, o1)
    local out = st:flatten(-2)
    free(st)
    if out.dtype ~= x.dtype then
        local r = out:to{dtype = x.dtype}
        free(out)
        out = r
    end
    return out
end

-- ==== normalisation ====

-- FP32LayerNorm(normalized_shape, {eps=1e-5, elementwise_affine=true, bias=true}): layer norm
-- computed on upcast input, weight and bias, cast back to the input's dtype.
local FP32LayerNorm = class("nemo.models.FP32LayerNorm", nn.LayerNorm)
M.FP32LayerNorm = FP32LayerNorm
function FP32LayerNorm:forward(x)
    local w = self.weight and upcast(self.weight)
    local b = self.bias and upcast(self.bias)
    local y = F.layer_norm(upcast(x), self.normalized_shape, w, b, self.eps)
    return y:to{dtype = x.dtype}
end

-- x * (1 + scale[:, None]) + shift[:, None], as diffusers writes the modulation; n is freed.
-- n (B, S, D) with scale / shift (B, D) takes the fused op (CPU and CUDA kernels; the same bits in
-- float32 / float64).
local function modulate(n, scale, shift)
    if F.modulate and n:dim() == 3 and scale:dim() == 2 and shift:dim() == 2 then
        local y = F.modulate(n, scale, shift)
        free(n)
        return y
    end
    local sc = 1 + scale:unsqueeze(1)
    local y1 = n * sc
    free(n, sc)
    local y = y1 + shift:unsqueeze(1)
    free(y1)
    return y
end
M.modulate = modulate

local function ln_noaffine(dim, eps, fo)
    return nn.LayerNorm(dim, {elementwise_affine = false, eps = eps, dtype = fo.dtype, device = fo.device})
end

-- AdaLayerNormZero(embedding_dim, {bias=true, dtype=, device=}): silu, linear (D -> 6D),
-- norm (LayerNorm, no affine, eps 1e-6). forward(x, emb) -> x_mod, gate_msa, shift_mlp,
-- scale_mlp, gate_mlp (chunk order shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp).
local AdaLayerNormZero = class("nemo.models.AdaLayerNormZero", nn.Module)
M.AdaLayerNormZero = AdaLayerNormZero
function AdaLayerNormZero:__init(embedding_dim, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    if opt(opts, "num_embeddings", nil) ~= nil then
        error("AdaLayerNormZero: num_embeddings (a CombinedTimestepLabelEmbeddings) is not supported", 2)
    end
    local norm_type = opt(opts, "norm_type", "layer_norm")
    if norm_type ~= "layer_norm" then
        error("AdaLayerNormZero: norm_type '" .. tostring(norm_type) .. "' is not supported (layer_norm)", 2)
    end
    self.silu = nn.SiLU()
    self.linear = nn.Linear(embedding_dim, 6 * embedding_dim,
        {bias = opt(opts, "bias", true), dtype = fo.dtype, device = fo.device})
    self.norm = ln_noaffine(embedding_dim, 1e-6, fo)
end
function AdaLayerNormZero:forward(x, emb)
    local a = self.silu(emb)
    local m = self.linear(a)
    free(a)
    local c = m:chunk(6, 1)
    local y = modulate(self.norm(x), c[2], c[1])
    return y, c[3], c[4], c[5], c[6]
end

-- AdaLayerNormZeroSingle(embedding_dim, {bias=true}): silu, linear (D -> 3D), norm.
-- forward(x, emb) -> x_mod, gate (chunk order shift, scale, gate).
local AdaLayerNormZeroSingle = class("nemo.models.AdaLayerNormZeroSingle", nn.Module)
M.AdaLayerNormZeroSingle = AdaLayerNormZeroSingle
function AdaLayerNormZeroSingle:__init(embedding_dim, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    self.silu = nn.SiLU()
    self.linear = nn.Linear(embedding_dim, 3 * embedding_dim,
        {bias = opt(opts, "bias", true), dtype = fo.dtype, device = fo.device})
    self.norm = ln_noaffine(embedding_dim, 1e-6, fo)
end
function AdaLayerNormZeroSingle:forward(x, emb)
    local a = self.silu(emb)
    local m = self.linear(a)
    free(a)
    local c = m:chunk(3, 1)
    return modulate(self.norm(x), c[2], c[1]), c[3]
end

-- AdaLayerNormContinuous(embedding_dim, conditioning_embedding_dim, {elementwise_affine=true,
-- eps=1e-5, bias=true, norm_type="layer_norm"}): silu, linear (cond -> 2D), norm.
-- forward(x, cond): chunk order (scale, shift), the opposite of the AdaLN-Zero layers.
local AdaLayerNormContinuous = class("nemo.models.AdaLayerNormContinuous", nn.Module)
M.AdaLayerNormContinuous = AdaLayerNormContinuous
function AdaLayerNormContinuous:__init(embedding_dim, conditioning_embedding_dim, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    local bias = opt(opts, "bias", true)
    local affine = opt(opts, "elementwise_affine", true)
    local eps = opt(opts, "eps", 1e-5)
    self.silu = nn.SiLU()
    self.linear = nn.Linear(conditioning_embedding_dim, 2 * embedding_dim,
        {bias = bias, dtype = fo.dtype, device = fo.device})
    local norm_type = opt(opts, "norm_type", "layer_norm")
    if norm_type == "layer_norm" then
        self.norm = nn.LayerNorm(embedding_dim, {eps = eps, elementwise_affine = affine, bias = bias,
            dtype = fo.dtype, device = fo.device})
    elseif norm_type == "rms_norm" then
        self.norm = nn.RMSNorm(embedding_dim, {eps = eps, elementwise_affine = affine, dtype = fo.dtype,
            device = fo.device})
    else
        error("AdaLayerNormContinuous: unknown norm_type '" .. tostring(norm_type) .. "'", 2)
    end
end
function AdaLayerNormContinuous:forward(x, cond)
    local a = self.silu(cond)
    local ac = a:to{dtype = x.dtype}
    local m = self.linear(ac)
    if not rawequal(ac, a) then free(ac) end
    free(a)
    local c = m:chunk(2, 1)
    return modulate(self.norm(x), c[1], c[2])
end

-- ==== feed-forward ====

-- diffusers' GELU module (activations.GELU): proj Linear(dim_in -> dim_out), then gelu
-- ({approximate = "none"|"tanh"}).
local GELUProj = class("nemo.models.GELU", nn.Module)
M.GELU = GELUProj
function GELUProj:__init(dim_in, dim_out, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    self.approximate = opt(opts, "approximate", "none")
    self.proj = nn.Linear(dim_in, dim_out, {bias = opt(opts, "bias", true), dtype = fo.dtype, device = fo.device})
end
function GELUProj:forward(x)
    local h = self.proj(x)
    local y = F.gelu(h, {approximate = self.approximate})
    free(h)
    return y
end
function GELUProj:extra_repr() return "approximate='" .. self.approximate .. "'" end

-- GEGLU: proj Linear(dim_in -> 2 dim_out); hidden, gate = chunk(2); hidden * gelu(gate).
local GEGLU = class("nemo.models.GEGLU", nn.Module)
M.GEGLU = GEGLU
function GEGLU:__init(dim_in, dim_out, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    self.proj = nn.Linear(dim_in, dim_out * 2, {bias = opt(opts, "bias", true), dtype = fo.dtype, device = fo.device})
end
function GEGLU:forward(x)
    local h = self.proj(x)
    local c = h:chunk(2, -1)
    local g = F.gelu(c[2])
    local y = c[1] * g
    free(h, g)
    return y
end

-- FeedForward(dim, {dim_out=dim, mult=4, dropout=0, activation_fn="geglu", final_dropout=false,
-- inner_dim=dim*mult, bias=true}): net = [act (with proj), Dropout, Linear(inner -> dim_out)
-- (, Dropout when final_dropout)]. activation_fn: "gelu", "gelu-approximate", "geglu".
local FeedForward = class("nemo.models.FeedForward", nn.Module)
M.FeedForward = FeedForward
function FeedForward:__init(dim, opts)
    nn.Module.__init(self)
    local fo = factory(opts)
    local dim_out = opt(opts, "dim_out", dim)
    local inner = opt(opts, "inner_dim", math.floor(dim * opt(opts, "mult", 4)))
    local bias = opt(opts, "bias", true)
    local dropout = opt(opts, "dropout", 0)
    local act_name = opt(opts, "activation_fn", "geglu")
    local lopts = {bias = bias, dtype = fo.dtype, device = fo.device}
    local act
    if act_name == "gelu" then act = GELUProj(dim, inner, lopts)
    elseif act_name == "gelu-approximate" then
        act = GELUProj(dim, inner, {bias = bias, approximate = "tanh", dtype = fo.dtype, device = fo.device})
    elseif act_name == "geglu" then act = GEGLU(dim, inner, lopts)
    else
        error(string.format("FeedForward: activation_fn '%s' is not supported (gelu, gelu-approximate, geglu)",
            tostring(act_name)), 2)
    end
    local mods = {act, nn.Dropout(dropout), nn.Linear(inner, dim_out, lopts)}
    if opt(opts, "final_dropout", false) then mods[#mods + 1] = nn.Dropout(dropout) end
    self.net = nn.ModuleList(mods)
end
function FeedForward:forward(x)
    local h = x
    for _, m in self.net:iter() do
        local y = m(h)
        if not rawequal(h, x) and not rawequal(y, h) then free(h) end
        h = y
    end
    return h
end

return M
