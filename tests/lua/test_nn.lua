-- tests/lua/test_nn.lua: nemo.nn: registration order and dotted names, state_dict round trip and
-- strict errors, conversions, modes, Dropout, printing, default initialisation, and the layers'
-- forward/backward against Lua-loop references. Lines that need an op family that has not
-- landed yet (F.linear, F.conv2d, F.mean ...) print "ok # SKIP".
package.path = "tests/lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"
local class = require "nemo.class"

local nn, F = nemo.nn, nemo.F

-- ==== helpers ====

local function flat(t)
    local out = {}
    local function walk(v) if type(v) == "table" then for _, u in ipairs(v) do walk(u) end else out[#out + 1] = v end end
    walk(t:tolist())
    return out
end
local function minmax(t)
    local lo, hi = math.huge, -math.huge
    for _, v in ipairs(flat(t)) do lo = math.min(lo, v); hi = math.max(hi, v) end
    return lo, hi
end
local function mean_std(t)
    local f = flat(t)
    local s, s2 = 0, 0
    for _, v in ipairs(f) do s = s + v end
    local m = s / #f
    for _, v in ipairs(f) do s2 = s2 + (v - m) ^ 2 end
    return m, math.sqrt(s2 / #f)
end
local function names_of(iter)
    local out = {}
    for name in iter do out[#out + 1] = name end
    return table.concat(out, " ")
end
local function equal_tensors(a, b)
    local fa, fb = flat(a), flat(b)
    if #fa ~= #fb then return false end
    for i = 1, #fa do if fa[i] ~= fb[i] then return false end end
    return true
end
local function rnd(shape, seed, dtype)
    return nemo.randn(shape, {dtype = dtype or "float64", generator = nemo.Generator(seed)})
end

-- ==== a small diffusers-like tree ====

local Attention, AttnParent = class("TestNN.Attention", nn.Module)
function Attention:__init(dim)
    AttnParent.__init(self)
    self.to_q = nn.Linear(dim, dim)
    self.to_k = nn.Linear(dim, dim, {bias = false})
    self.to_out = nn.ModuleList{nn.Linear(dim, dim), nn.Dropout(0.0)}
end

local Block, BlockParent = class("TestNN.Block", nn.Module)
function Block:__init(dim)
    BlockParent.__init(self)
    self.norm1 = nn.LayerNorm(dim, {elementwise_affine = false, eps = 1e-6})
    self.attn = Attention(dim)
    self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU{approximate = "tanh"}, nn.Linear(2 * dim, dim))
end

local Model, ModelParent = class("TestNN.Model", nn.Module)
function Model:__init(dim, nblocks)
    ModelParent.__init(self)
    self.x_embedder = nn.Linear(3, dim)
    self.scale = nn.Parameter(nemo.ones(dim))        -- a direct parameter, registered after a child
    local blocks = {}
    for i = 1, nblocks do blocks[i] = Block(dim) end
    self.blocks = nn.ModuleList(blocks)
    self:register_buffer("pos", nemo.arange(dim))                       -- int64, persistent
    self:register_buffer("cache", nemo.zeros(dim), {persistent = false})
    self.norm_out = nn.LayerNorm(dim)
    self.proj_out = nn.Linear(dim, 3)
    self.plain = 7                                   -- a plain field, not registered
end

nemo.manual_seed(1)
local m = Model(4, 2)

local expected_params = table.concat({
    "scale",
    "x_embedder.weight", "x_embedder.bias",
    "blocks.0.attn.to_q.weight", "blocks.0.attn.to_q.bias", "blocks.0.attn.to_k.weight",
    "blocks.0.attn.to_out.0.weight", "blocks.0.attn.to_out.0.bias",
    "blocks.0.ff.0.weight", "blocks.0.ff.0.bias", "blocks.0.ff.2.weight", "blocks.0.ff.2.bias",
    "blocks.1.attn.to_q.weight", "blocks.1.attn.to_q.bias", "blocks.1.attn.to_k.weight",
    "blocks.1.attn.to_out.0.weight", "blocks.1.attn.to_out.0.bias",
    "blocks.1.ff.0.weight", "blocks.1.ff.0.bias", "blocks.1.ff.2.weight", "blocks.1.ff.2.bias",
    "norm_out.weight", "norm_out.bias", "proj_out.weight", "proj_out.bias",
}, " ")
T.is(names_of(m:named_parameters()), expected_params,
    "named_parameters: own parameters first, then children in registration order, dotted names")
T.is(#m:parameters(), 25, "parameters() is an array of 25")
T.is(names_of(m:named_modules()),
    " x_embedder blocks blocks.0 blocks.0.norm1 blocks.0.attn blocks.0.attn.to_q blocks.0.attn.to_k " ..
    "blocks.0.attn.to_out blocks.0.attn.to_out.0 blocks.0.attn.to_out.1 blocks.0.ff blocks.0.ff.0 " ..
    "blocks.0.ff.1 blocks.0.ff.2 blocks.1 blocks.1.norm1 blocks.1.attn blocks.1.attn.to_q blocks.1.attn.to_k " ..
    "blocks.1.attn.to_out blocks.1.attn.to_out.0 blocks.1.attn.to_out.1 blocks.1.ff blocks.1.ff.0 " ..
    "blocks.1.ff.1 blocks.1.ff.2 norm_out proj_out",
    "named_modules: pre-order, root named \"\"")
T.is(names_of(m:named_children()), "x_embedder blocks norm_out proj_out", "named_children in order")
T.is(#m:children(), 4, "children() is an array of 4")
T.is(#m:modules(), 29, "modules() counts every module once")
T.is(names_of(m:named_buffers()), "pos cache", "named_buffers lists persistent and non-persistent buffers")
T.ok(m.blocks:get(1).attn.to_out:get(2).p == 0, "Dropout sits at to_out index 1 (get(2))")
T.is(m.blocks["0"], m.blocks:get(1), "list child by name: blocks[\"0\"] is blocks:get(1)")
T.is(m.plain, 7, "plain fields stay plain fields")
T.is(m:get_submodule("blocks.1.attn.to_q"), m.blocks:get(2).attn.to_q, "get_submodule by dotted path")
T.is(m:get_parameter("blocks.0.attn.to_k.weight"), m.blocks:get(1).attn.to_k.weight, "get_parameter by dotted path")
T.raises(function() m:get_submodule("blocks.7") end, "has no child module '7'", "get_submodule names the missing part")
T.is(m:num_parameters(), 4 + 4*3+4 + 2 * (4*4+4 + 4*4 + 4*4+4 + 4*8+8 + 8*4+4) + 4+4 + 4*3+3,
    "num_parameters counts every element")
T.is(m.blocks:get(1).norm1.weight, nil, "LayerNorm(elementwise_affine=false): weight is nil")
T.is(#m.blocks:get(1).norm1:parameters(), 0, "LayerNorm(elementwise_affine=false) has no parameters")
T.is(class.registry["Linear"], nn.Linear, "class.registry resolves the short name Linear")
T.is(class.registry["nemo.nn.Linear"], nn.Linear, "class.registry resolves nemo.nn.Linear")
T.ok(nn.is_parameter(m.scale) and m.scale.requires_grad, "nn.Parameter: marked and requires grad")
T.ok(not nn.Parameter(nemo.ones(2), false).requires_grad, "nn.Parameter(t, false) does not require grad")

-- reassigning keeps the slot's position; shared parameters appear once in named_parameters
do
    local s = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    local l0 = s:get(1)
    l0.weight = nn.Parameter(nemo.zeros(2, 2))
    T.is(names_of(s:named_parameters()), "0.weight 0.bias 1.weight 1.bias", "reassigning a parameter keeps its place")
    s:get(2).weight = l0.weight
    T.is(names_of(s:named_parameters()), "0.weight 0.bias 1.bias", "a shared parameter is reported once")
    local sd, keys = s:state_dict()
    T.is(table.concat(keys, " "), "0.weight 0.bias 1.weight 1.bias", "state_dict keeps shared parameters under every name")
    T.ok(sd["1.weight"] ~= nil, "state_dict has the shared name")
    T.raises(function() l0.weight = nemo.zeros(2, 2) end, "cannot assign a plain tensor as parameter 'weight'",
        "assigning a plain tensor to a parameter name is an error")
    l0.bias = nil
    T.is(names_of(l0:named_parameters()), "weight", "assigning nil to a parameter leaves an empty slot")
    T.raises(function() l0:register_parameter("forward", nemo.zeros(1)) end, "conflicts with a method",
        "register_parameter refuses a method name")
    T.raises(function() l0:add_module("a.b", nn.Identity()) end, "cannot contain '.'", "names cannot contain '.'")
end

-- ==== ModuleList ====
do
    local l = nn.ModuleList()
    l:append(nn.Linear(1, 1)):append(nn.SiLU())
    l:insert(2, nn.Identity())
    T.is(l:len(), 3, "ModuleList:len() after append, append, insert")
    T.is(names_of(l:named_children()), "0 1 2", "ModuleList children renamed 0..n-1 after insert")
    T.ok(class.isinstance(l:get(2), nn.Identity) and class.isinstance(l:get(-1), nn.SiLU), "get(2) and get(-1)")
    local seen = {}
    for i, c in l:iter() do seen[#seen + 1] = i .. "=" .. c:_get_name() end
    T.is(table.concat(seen, " "), "1=Linear 2=Identity 3=SiLU", "iter() yields 1-based positions in order")
    T.raises(function() return l[0] end, "numeric index [0] is not supported", "list[0] is refused with a hint")
    T.raises(function() l:get(4) end, "index 4 out of range", "get out of range names the index")
    T.is(class.isinstance(l:pop(1), nn.Linear) and names_of(l:named_children()), "0 1", "pop(1) renumbers")
end

-- ==== state_dict / load_state_dict ====
do
    local sd, keys = m:state_dict()
    T.is(#keys, 26, "state_dict: 25 parameters + the persistent buffer")
    T.is(keys[1] .. " " .. keys[2] .. " " .. keys[#keys], "scale pos proj_out.bias",
        "state_dict order: own parameters, own persistent buffers, then children")
    T.ok(sd.cache == nil, "non-persistent buffer not in state_dict")
    T.ok(not sd["scale"].requires_grad, "state_dict tensors are detached")
    local n = 0
    for _ in pairs(sd) do n = n + 1 end
    T.is(n, #keys, "sd holds exactly the listed keys")

    nemo.manual_seed(99)
    local m2 = Model(4, 2)
    T.ok(not equal_tensors(m2.proj_out.weight, m.proj_out.weight), "a second model starts different")
    local res = m2:load_state_dict(sd)
    local all = true
    for _, k in ipairs(keys) do
        if not equal_tensors(m2:get_parameter(k), sd[k]) then all = false; T.diag("differs: " .. k) end
    end
    T.ok(all, "load_state_dict round trip: every tensor equal")
    T.is(#res.missing_keys + #res.unexpected_keys, 0, "strict load returns empty key lists")
    T.ok(m2.scale.requires_grad and nn.is_parameter(m2.scale), "load keeps parameters as parameters")

    -- dtype conversion on load
    local sd64 = {}
    for k, v in pairs(sd) do sd64[k] = v:to{dtype = v:is_floating_point() and "float64" or v.dtype} end
    nemo.manual_seed(5)
    local m3 = Model(4, 2)
    m3:load_state_dict(sd64)
    T.ok(m3.proj_out.weight.dtype == "float32" and equal_tensors(m3.proj_out.weight, m.proj_out.weight),
        "load_state_dict converts float64 values into float32 parameters")

    -- strict errors list every problem in one message
    local bad = {}
    for k, v in pairs(sd) do bad[k] = v end
    bad["blocks.1.ff.2.bias"] = nil
    bad["norm_out.weight"] = nil
    bad["extra.weight"] = nemo.zeros(1)
    bad["blocks.9.x"] = nemo.zeros(1)
    bad["x_embedder.weight"] = nemo.zeros(3, 4)
    bad["proj_out.weight"] = nemo.zeros(4, 4)
    local before = flat(m3.scale)
    m3.scale:requires_grad_(true)
    local ok, err = pcall(function() m3:load_state_dict(bad) end)
    T.ok(not ok, "strict load with problems raises")
    err = tostring(err)
    T.ok(err:find("missing keys: blocks.1.ff.2.bias, norm_out.weight", 1, true), "error lists every missing key", err)
    T.ok(err:find("unexpected keys: blocks.9.x, extra.weight", 1, true), "error lists every unexpected key", err)
    T.ok(err:find("shape mismatch for x_embedder.weight: checkpoint (3, 4) vs model (4, 3)", 1, true) and
         err:find("shape mismatch for proj_out.weight: checkpoint (4, 4) vs model (3, 4)", 1, true),
        "error lists every shape mismatch with both shapes", err)
    T.ok(equal_tensors(m3.scale, nemo.tensor(before)), "a failed load copies nothing")

    -- exact message on a small module
    local lin = nn.Linear(4, 3)
    local ok2, err2 = pcall(function()
        lin:load_state_dict({weight = nemo.zeros(3, 5), extra = nemo.zeros(1)})
    end)
    T.ok(not ok2 and tostring(err2):find("Linear:load_state_dict: missing keys: bias; unexpected keys: extra; " ..
        "shape mismatch for weight: checkpoint (3, 5) vs model (3, 4)", 1, true), "exact strict error message",
        tostring(err2))

    -- non-strict
    local partial = {["x_embedder.weight"] = nemo.full({4, 3}, 0.5), ["nope"] = nemo.zeros(2)}
    local r = m3:load_state_dict(partial, {strict = false})
    T.is(#r.missing_keys, 25, "strict=false: missing_keys lists the 25 absent keys")
    T.is(r.missing_keys[1], "scale", "strict=false: missing_keys in state_dict order")
    T.is(table.concat(r.unexpected_keys, ","), "nope", "strict=false: unexpected_keys")
    T.ok(equal_tensors(m3.x_embedder.weight, nemo.full({4, 3}, 0.5)), "strict=false still loads the present keys")
    T.raises(function() m3:load_state_dict({["x_embedder.weight"] = nemo.zeros(2)}, {strict = false}) end,
        "shape mismatch for x_embedder.weight", "strict=false: a shape mismatch is still an error")

    -- assign=true: the parameter shares the checkpoint's memory (no copy), same object, still a parameter
    local lin = nn.Linear(2, 2)
    local wobj = lin.weight
    local src = {weight = nemo.full({2, 2}, 3.0, {dtype = "float64"}), bias = nemo.zeros(2)}
    lin:load_state_dict(src, {assign = true})
    nemo.no_grad(function() src.weight:fill_(4) end)
    T.ok(rawequal(lin.weight, wobj) and lin.weight.requires_grad and lin.weight.dtype == "float64" and
         equal_tensors(lin.weight, nemo.full({2, 2}, 4)), "assign=true: same object, shares the checkpoint tensor's memory")
end

-- ==== to / requires_grad_ / train / eval / apply / zero_grad ====

-- a module made of pointwise ops only: y = x * w + shift
local Scale, ScaleParent = class("TestNN.Scale", nn.Module)
function Scale:__init(n)
    ScaleParent.__init(self)
    self.w = nn.Parameter(nemo.full({n}, 2.0))
    self:register_buffer("shift", nemo.ones(n))
end
function Scale:forward(x) return x * self.w + self.shift end

do
    local mm = Model(4, 1)
    local p = mm.proj_out.weight
    local v = flat(p)
    p.grad = nemo.ones(3, 4)
    mm:to{dtype = "float64"}
    local all64 = true
    for _, q in ipairs(mm:parameters()) do if q.dtype ~= "float64" then all64 = false end end
    T.ok(all64, "to{dtype=float64}: every parameter is float64")
    T.ok(rawequal(mm.proj_out.weight, p), "to keeps the same parameter object in the slot")
    T.ok(p.requires_grad and nn.is_parameter(p), "to keeps requires_grad")
    T.close(p, v, 0, 0, "to: values preserved exactly (f32 -> f64)")
    T.is(p.grad.dtype, "float64", "to converts .grad too")
    T.is(mm.cache.dtype, "float64", "to converts float buffers")
    T.is(mm.pos.dtype, "int64", "to leaves integer buffers alone")
    local big = nn.Linear(256, 256)
    collectgarbage(); collectgarbage()
    local before = nemo.memory_stats().current
    big:to{dtype = "float64"}
    local grew = nemo.memory_stats().current - before
    T.is(grew, (256 * 256 + 256) * 4, "to(float64) frees the old float32 storage at once (growth = 4 bytes/element)")
    mm:to("float32")
    T.is(mm.scale.dtype, "float32", "to(\"float32\") string form")

    mm:requires_grad_(false)
    local any = false
    for _, q in ipairs(mm:parameters()) do if q.requires_grad then any = true end end
    T.ok(not any, "requires_grad_(false) freezes every parameter")
    T.is(mm:num_parameters{only_trainable = true}, 0, "no trainable parameters after freezing")
    local s = Scale(3)
    s:requires_grad_(false)
    T.ok(not s(nemo.ones(3)).requires_grad, "a frozen module's output does not require grad")
    s:requires_grad_(true)
    local y = s(nemo.tensor{1, 2, 3})
    T.ok(y.requires_grad, "unfrozen: output requires grad")
    y:backward(nemo.ones(3))
    T.close(s.w.grad, {1, 2, 3}, 0, 0, "Scale backward: dw = x")
    s:zero_grad()
    T.is(s.w.grad, nil, "zero_grad sets grads to nil")

    mm:eval()
    local all_eval = true
    for _, q in ipairs(mm:modules()) do if q.training then all_eval = false end end
    T.ok(all_eval, "eval() reaches every module")
    mm:train()
    T.ok(mm.blocks:get(1).attn.to_out:get(2).training, "train() reaches a deep Dropout")
    mm.blocks:train(false)
    T.ok(mm.training and not mm.blocks:get(1).ff.training, "train(false) on a subtree only")

    local order = {}
    nn.Sequential(nn.Linear(1, 1), nn.Sequential(nn.SiLU())):apply(function(x) order[#order + 1] = x:_get_name() end)
    T.is(table.concat(order, " "), "Linear SiLU Sequential Sequential", "apply: children first, then self")
end

-- ==== Dropout ====
do
    local d = nn.Dropout(0)
    local x = nemo.randn(50, {generator = nemo.Generator(3)})
    T.ok(rawequal(d(x), x), "Dropout(p=0) returns its input in training")
    local d5 = nn.Dropout(0.5, {generator = nemo.Generator(11)})
    local ones = nemo.ones(200, 100)
    local y = d5(ones)
    local zeros, twos, other = 0, 0, 0
    for _, v in ipairs(flat(y)) do
        if v == 0 then zeros = zeros + 1 elseif v == 2 then twos = twos + 1 else other = other + 1 end
    end
    T.near(zeros / 20000, 0.5, 0.02, "Dropout(0.5) train: fraction zeroed (tol 0.02, ~6 sigma)")
    T.is(other, 0, "Dropout(0.5) train: kept values scaled by exactly 1/(1-p) = 2")
    T.near((twos * 2) / 20000, 1, 0.04, "Dropout(0.5) train: mean preserved (tol 0.04)")
    local xg = nemo.ones(8, 8):requires_grad_()
    local yg = d5(xg)
    yg:backward(nemo.ones(8, 8))
    T.ok(equal_tensors(xg.grad, yg:detach()), "Dropout backward: gradient is the scaled mask")
    d5:eval()
    T.ok(rawequal(d5(ones), ones), "Dropout(0.5) in eval is the identity")
    T.raises(function() nn.Dropout(1.5) end, "between 0 and 1", "Dropout(p > 1) is refused")
end

-- ==== printing ====
do
    local s = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Dropout(0.5))
    T.is(tostring(s), "Sequential(\n  (0): Linear(in_features=4, out_features=8, bias=true)\n" ..
        "  (1): GELU(approximate='none')\n  (2): Dropout(p=0.5)\n)", "Sequential prints like PyTorch")
    T.is(tostring(nn.Linear(2, 3, {bias = false})), "Linear(in_features=2, out_features=3, bias=false)", "Linear repr")
    local b = Block(4)
    local expected = table.concat({
        "Block(",
        "  (norm1): LayerNorm((4,), eps=1e-06, elementwise_affine=false)",
        "  (attn): Attention(",
        "    (to_q): Linear(in_features=4, out_features=4, bias=true)",
        "    (to_k): Linear(in_features=4, out_features=4, bias=false)",
        "    (to_out): ModuleList(",
        "      (0): Linear(in_features=4, out_features=4, bias=true)",
        "      (1): Dropout(p=0)",
        "    )",
        "  )",
        "  (ff): Sequential(",
        "    (0): Linear(in_features=4, out_features=8, bias=true)",
        "    (1): GELU(approximate='tanh')",
        "    (2): Linear(in_features=8, out_features=4, bias=true)",
        "  )",
        ")"}, "\n")
    T.is(tostring(b), expected, "nested tree prints with indentation")
    local l = nn.ModuleList{nn.SiLU(), nn.SiLU(), nn.SiLU(), nn.Identity()}
    T.is(tostring(l), "ModuleList(\n  (0-2): 3 x SiLU()\n  (3): Identity()\n)", "ModuleList groups repeated children")
    T.is(tostring(nn.Conv2d(3, 8, 3, {padding = 1, groups = 1, bias = false})),
        "Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=false)", "Conv2d repr")
    T.is(tostring(nn.GroupNorm(2, 4)), "GroupNorm(2, 4, eps=1e-05, affine=true)", "GroupNorm repr")
    T.is(tostring(nn.RMSNorm(6)), "RMSNorm((6,), eps=nil, elementwise_affine=true)", "RMSNorm repr")
    T.is(tostring(nn.Embedding(10, 3)), "Embedding(10, 3)", "Embedding repr")
end

-- ==== errors ====
do
    local Bare = class("TestNN.Bare", nn.Module)
    function Bare:__init() nn.Module.__init(self) end
    T.raises(function() Bare()(nemo.ones(1)) end, "Bare: forward is not implemented", "missing forward names the class")
    T.raises(function() nn.Linear(4, 8)(nemo.ones(2, 5)) end,
        "Linear(in_features=4, out_features=8, bias=true): expected input (..., 4), got shape (2, 5)",
        "Linear wrong input size names the layer and both shapes")
    T.raises(function() local y = nn.Sequential(nn.Linear(4, 8))(nemo.ones(5)); return y end,
        "test_nn%.lua:%d+: Linear", "a layer's input error points at the user's line, not inside nn")
    T.raises(function() nn.LayerNorm({3, 4})(nemo.ones(2, 4, 3)) end, "expected input (..., 3, 4), got shape (2, 4, 3)",
        "LayerNorm wrong trailing shape")
    T.raises(function() nn.GroupNorm(2, 4)(nemo.ones(2, 6, 3)) end,
        "GroupNorm(2, 4, eps=1e-05, affine=true): expected input (N, 4, *), got shape (2, 6, 3)", "GroupNorm wrong channels")
    T.raises(function() nn.Conv2d(3, 4, 3)(nemo.ones(1, 2, 5, 5)) end, "got shape (1, 2, 5, 5)",
        "Conv2d wrong channels names the shape")
    T.raises(function() nn.Conv3d(3, 4, 3)(nemo.ones(3, 5, 5)) end, "expected input (N, 3, D, H, W)",
        "Conv3d wrong rank")
    T.raises(function() nn.GroupNorm(3, 4) end, "num_channels (4) must be divisible by num_groups (3)",
        "GroupNorm constructor check")
    T.raises(function() nn.Embedding(5, 2)(nemo.ones(3)) end, "expected integer indices", "Embedding float indices")
    T.raises(function() nn.Linear(0.5, 2) end, "in_features must be a non-negative integer", "Linear bad size")
    T.raises(function() nn.Module.register_parameter(setmetatable({}, nn.Linear), "w", nil) end,
        "Module.__init was not called", "a module without Module.__init says so")
end

-- ==== default initialisation and nn.init ====
do
    local lin = nn.Linear(7, 5)
    local b = 1 / math.sqrt(7)
    local lo, hi = minmax(lin.weight)
    T.ok(lo >= -b and hi <= b and hi - lo > b, string.format(
        "Linear(7, 5) weight within +-1/sqrt(7) = %.4f and spread: [%.4f, %.4f]", b, lo, hi))
    lo, hi = minmax(lin.bias)
    T.ok(lo >= -b and hi <= b and hi > lo, string.format("Linear(7, 5) bias within +-%.4f: [%.4f, %.4f]", b, lo, hi))
    local big = nn.Linear(64, 256)
    local m0, sd0 = mean_std(big.weight)
    local bb = 1 / 8
    T.near(sd0, bb / math.sqrt(3), 0.004, "Linear(64, 256) weight std = bound/sqrt(3) (uniform; tol 0.004)")
    T.near(m0, 0, 0.003, "Linear(64, 256) weight mean 0 (tol 0.003)")
    local conv = nn.Conv2d(3, 8, 3)
    lo, hi = minmax(conv.weight)
    local cb = 1 / math.sqrt(27)
    T.ok(lo >= -cb and hi <= cb and hi - lo > cb, string.format("Conv2d(3, 8, 3) weight within +-1/sqrt(27): [%.4f, %.4f]", lo, hi))
    T.is(table.concat(conv.weight.shape, "x"), "8x3x3x3", "Conv2d weight shape (out, in, kh, kw)")
    local conv3 = nn.Conv3d(4, 6, {1, 2, 2}, {groups = 2})
    T.is(table.concat(conv3.weight.shape, "x"), "6x2x1x2x2", "Conv3d(groups=2) weight shape (out, in/groups, kd, kh, kw)")
    lo, hi = minmax(conv3.bias)
    T.ok(lo >= -1 / math.sqrt(8) and hi <= 1 / math.sqrt(8), "Conv3d bias within +-1/sqrt(fan_in = 8)")
    local emb = nn.Embedding(100, 50, {padding_idx = 2})
    local em, es = mean_std(emb.weight)
    T.near(em, 0, 0.06, "Embedding weight ~ N(0, 1): mean (tol 0.06)")
    T.near(es, 1, 0.06, "Embedding weight ~ N(0, 1): std (tol 0.06)")
    T.ok(equal_tensors(emb.weight:select(0, 2), nemo.zeros(50)), "Embedding padding_idx row is zero")
    local ln, gn, rn = nn.LayerNorm({2, 3}), nn.GroupNorm(2, 4), nn.RMSNorm(5)
    T.ok(equal_tensors(ln.weight, nemo.ones(2, 3)) and equal_tensors(ln.bias, nemo.zeros(2, 3)) and
         equal_tensors(gn.weight, nemo.ones(4)) and equal_tensors(gn.bias, nemo.zeros(4)) and
         equal_tensors(rn.weight, nemo.ones(5)), "norm layers start at ones / zeros")
    T.is(nn.LayerNorm(4, {bias = false}).bias, nil, "LayerNorm(bias=false) has no bias")
    local a1 = nn.Linear(3, 4, {generator = nemo.Generator(7)})
    local a2 = nn.Linear(3, 4, {generator = nemo.Generator(7)})
    T.ok(equal_tensors(a1.weight, a2.weight) and equal_tensors(a1.bias, a2.bias), "opts.generator makes init reproducible")
    nemo.manual_seed(42); local d1 = nn.Linear(3, 4)
    nemo.manual_seed(42); local d2 = nn.Linear(3, 4)
    T.ok(equal_tensors(d1.weight, d2.weight), "the default generator is used (manual_seed reproduces)")
    T.is(nn.Linear(3, 4, {dtype = "float64"}).weight.dtype, "float64", "Linear(dtype=float64)")

    local init = nn.init
    local fi, fo = init.calculate_fan_in_and_fan_out(nemo.empty(8, 3, 3, 3))
    T.ok(fi == 27 and fo == 72, "calculate_fan_in_and_fan_out (8, 3, 3, 3) = 27, 72")
    T.raises(function() init.calculate_fan_in_and_fan_out(nemo.empty(5)) end, "fewer than 2 dimensions",
        "fan of a 1-D tensor is an error")
    T.near(init.calculate_gain("leaky_relu", math.sqrt(5)), math.sqrt(1 / 3), 1e-15, "calculate_gain leaky_relu sqrt(5)")
    T.near(init.calculate_gain("relu"), math.sqrt(2), 1e-15, "calculate_gain relu")
    T.near(init.calculate_gain("tanh"), 5 / 3, 1e-15, "calculate_gain tanh")
    local w = nn.Parameter(nemo.empty(20, 30))
    init.xavier_uniform_(w, {generator = nemo.Generator(1)})
    local xb = math.sqrt(6 / 50)
    lo, hi = minmax(w)
    T.ok(lo >= -xb and hi <= xb and hi - lo > xb, string.format("xavier_uniform_ within +-sqrt(6/50) = %.4f", xb))
    init.kaiming_uniform_(w, {mode = "fan_out", nonlinearity = "relu"})
    lo, hi = minmax(w)
    local kb = math.sqrt(2) * math.sqrt(3 / 20)
    T.ok(lo >= -kb and hi <= kb and hi - lo > kb, string.format("kaiming_uniform_(fan_out, relu) within +-%.4f", kb))
    local wn = nemo.empty(400, 100)
    init.kaiming_normal_(wn, {generator = nemo.Generator(2)})
    local _, ks = mean_std(wn)
    T.near(ks, math.sqrt(2 / 100), 0.004, "kaiming_normal_ std sqrt(2/fan_in) (tol 0.004)")
    init.constant_(w, 0.25)
    T.ok(equal_tensors(w, nemo.full({20, 30}, 0.25)), "constant_ on a parameter that requires grad")
    init.ones_(w); T.ok(equal_tensors(w, nemo.ones(20, 30)), "ones_")
    init.zeros_(w); T.ok(equal_tensors(w, nemo.zeros(20, 30)), "zeros_")
    local n1 = init.normal_(nemo.empty(5), 3, 0.5, {generator = nemo.Generator(4)})
    local n2 = init.normal_(nemo.empty(5), {mean = 3, std = 0.5, generator = nemo.Generator(4)})
    T.ok(equal_tensors(n1, n2), "normal_ positional and keyword forms agree with the same generator")
    local u = init.uniform_(nemo.empty(1000), -2, -1)
    lo, hi = minmax(u)
    T.ok(lo >= -2 and hi <= -1, "uniform_(-2, -1) stays in range")
end

-- ==== layer forward/backward against Lua-loop references (need the op families) ====

local function skip_unless(fns, n, what, body)
    local missing = {}
    for _, f in ipairs(fns) do if F[f] == nil then missing[#missing + 1] = "F." .. f end end
    if #missing > 0 then
        for i = 1, n do T.skip(what .. " (" .. i .. ")", table.concat(missing, ", ") .. " not landed yet") end
        return
    end
    body()
end

-- Linear: y = x W^T + b, dW = g^T x, db = sum g, dx = g W (float64, tol 1e-12)
skip_unless({"linear"}, 4, "Linear forward/backward vs loops", function()
    local lin = nn.Linear(5, 4, {dtype = "float64", generator = nemo.Generator(3)})
    local xc = rnd({3, 5, 2}, 10):requires_grad_()
    local x = xc:transpose(1, 2)                   -- (3, 2, 5), non-contiguous
    local y = lin(x)
    local g = rnd({3, 2, 4}, 11)
    y:backward(g)
    local X, W, B, G = x:tolist(), lin.weight:tolist(), lin.bias:tolist(), g:tolist()
    local yref, dw, db, dx = {}, {}, {}, {}
    for o = 1, 4 do dw[o] = {}; for i = 1, 5 do dw[o][i] = 0 end; db[o] = 0 end
    for b = 1, 3 do
        yref[b], dx[b] = {}, {}
        for t = 1, 2 do
            yref[b][t], dx[b][t] = {}, {}
            for o = 1, 4 do
                local s = B[o]
                for i = 1, 5 do s = s + X[b][t][i] * W[o][i] end
                yref[b][t][o] = s
                db[o] = db[o] + G[b][t][o]
                for i = 1, 5 do dw[o][i] = dw[o][i] + G[b][t][o] * X[b][t][i] end
            end
            for i = 1, 5 do
                local s = 0
                for o = 1, 4 do s = s + G[b][t][o] * W[o][i] end
                dx[b][t][i] = s
            end
        end
    end
    T.close(y, yref, 1e-12, 1e-12, "Linear forward f64 (3, 2, 5) non-contiguous vs loops")
    T.close(lin.weight.grad, dw, 1e-12, 1e-12, "Linear dW = g^T x vs loops")
    T.close(lin.bias.grad, db, 1e-12, 1e-12, "Linear db = sum g vs loops")
    T.close(xc.grad:transpose(1, 2), dx, 1e-12, 1e-12, "Linear dx = g W vs loops")
end)

skip_unless({"linear", "matmul"}, 2, "Linear vs matmul + bias", function()
    local lin = nn.Linear(33, 7, {generator = nemo.Generator(8)})
    local x = rnd({5, 33}, 12, "float32")
    local ref = nemo.no_grad(function() return x:matmul(lin.weight:t()) + lin.bias end)
    T.close(lin(x), ref, 1e-6, 1e-6, "Linear(33, 7) f32 equals x:matmul(W^T) + b")
    local lb = nn.Linear(33, 7, {generator = nemo.Generator(8), dtype = "bfloat16"})
    T.close(lb(x:bfloat16()):float(), ref, 2e-2, 2e-2, "Linear(dtype=bfloat16) within bf16 tolerance of f32")
end)

skip_unless({"layer_norm", "rms_norm", "group_norm"}, 3, "norm layers vs loops", function()
    local x = rnd({2, 4, 3}, 20)
    local ln = nn.LayerNorm(3, {dtype = "float64", eps = 1e-5})
    local rn = nn.RMSNorm(3, {dtype = "float64", eps = 1e-6})
    local gn = nn.GroupNorm(2, 4, {dtype = "float64"})
    nemo.no_grad(function()
        ln.weight:copy_(nemo.tensor{0.5, -1, 2}); ln.bias:copy_(nemo.tensor({0.1, 0.2, 0.3}, {dtype = "float64"}))
        rn.weight:copy_(nemo.tensor{1.5, 1, -0.5})
        gn.weight:copy_(nemo.tensor{1, 2, 3, 4}); gn.bias:copy_(nemo.tensor{0, -1, 1, 0})
    end)
    local X = x:tolist()
    local lref, rref, gref = {}, {}, {}
    local lw, lb, rw = {0.5, -1, 2}, {0.1, 0.2, 0.3}, {1.5, 1, -0.5}
    for a = 1, 2 do
        lref[a], rref[a] = {}, {}
        for c = 1, 4 do
            local row = X[a][c]
            local mu = (row[1] + row[2] + row[3]) / 3
            local var = ((row[1] - mu) ^ 2 + (row[2] - mu) ^ 2 + (row[3] - mu) ^ 2) / 3
            local ms = (row[1] ^ 2 + row[2] ^ 2 + row[3] ^ 2) / 3
            lref[a][c], rref[a][c] = {}, {}
            for k = 1, 3 do
                lref[a][c][k] = (row[k] - mu) / math.sqrt(var + 1e-5) * lw[k] + lb[k]
                rref[a][c][k] = row[k] / math.sqrt(ms + 1e-6) * rw[k]
            end
        end
        -- group norm: groups of 2 channels x 3 positions
        gref[a] = {}
        local gw, gb = {1, 2, 3, 4}, {0, -1, 1, 0}
        for grp = 0, 1 do
            local vals = {}
            for c = grp * 2 + 1, grp * 2 + 2 do for k = 1, 3 do vals[#vals + 1] = X[a][c][k] end end
            local mu, var = 0, 0
            for _, v in ipairs(vals) do mu = mu + v / 6 end
            for _, v in ipairs(vals) do var = var + (v - mu) ^ 2 / 6 end
            for c = grp * 2 + 1, grp * 2 + 2 do
                gref[a][c] = {}
                for k = 1, 3 do gref[a][c][k] = (X[a][c][k] - mu) / math.sqrt(var + 1e-5) * gw[c] + gb[c] end
            end
        end
    end
    T.close(ln(x), lref, 1e-12, 1e-12, "LayerNorm forward f64 vs loops")
    T.close(rn(x), rref, 1e-12, 1e-12, "RMSNorm forward f64 vs loops")
    T.close(gn(x), gref, 1e-12, 1e-12, "GroupNorm forward f64 (2, 4, 3), 2 groups vs loops")
end)

skip_unless({"conv2d"}, 6, "Conv2d forward vs loops", function()
    local function conv_ref(X, W, Bs, stride, pad, groups, Hout, Wout)
        local N, H, Wd = #X, #X[1][1], #X[1][1][1]
        local Cout, cpg, KH, KW = #W, #W[1], #W[1][1], #W[1][1][1]
        local opg = Cout / groups
        local out = {}
        for n = 1, N do
            out[n] = {}
            for o = 1, Cout do
                out[n][o] = {}
                local g0 = math.floor((o - 1) / opg) * cpg
                for i = 1, Hout do
                    out[n][o][i] = {}
                    for j = 1, Wout do
                        local s = Bs[o]
                        for c = 1, cpg do for kh = 1, KH do for kw = 1, KW do
                            local hi = (i - 1) * stride + kh - pad
                            local wi = (j - 1) * stride + kw - pad
                            if hi >= 1 and hi <= H and wi >= 1 and wi <= Wd then
                                s = s + X[n][g0 + c][hi][wi] * W[o][c][kh][kw]
                            end
                        end end end
                        out[n][o][i][j] = s
                    end
                end
            end
        end
        return out
    end
    local x = rnd({2, 4, 5, 6}, 30)
    local c1 = nn.Conv2d(4, 3, 3, {stride = 2, padding = 1, dtype = "float64"})
    local y1 = c1(x)
    T.close(y1, conv_ref(x:tolist(), c1.weight:tolist(), c1.bias:tolist(), 2, 1, 1, 3, 3), 1e-12, 1e-12,
        "Conv2d(4, 3, 3, stride 2, padding 1) f64 vs loops")
    local c2 = nn.Conv2d(4, 6, 3, {groups = 2, dtype = "float64"})
    T.close(c2(x), conv_ref(x:tolist(), c2.weight:tolist(), c2.bias:tolist(), 1, 0, 2, 3, 4), 1e-12, 1e-12,
        "Conv2d(4, 6, 3, groups 2) f64 vs loops")
    y1:backward(nemo.ones_like(y1))
    T.ok(c1.weight.grad ~= nil and table.concat(c1.weight.grad.shape, "x") == "3x4x3x3",
        "Conv2d backward fills weight.grad with the weight's shape")
    T.close(c1.bias.grad, {18, 18, 18}, 0, 1e-12, "Conv2d bias.grad = N * Hout * Wout for a ones gradient")
    local c3 = nn.Conv2d(4, 2, 3, {padding = "same", bias = false, dtype = "float64"})
    local x1 = x:select(0, 0)
    local y3 = c3(x1)
    T.is(table.concat(y3.shape, "x"), "2x5x6", "Conv2d unbatched input (C, H, W) with padding='same' keeps (H, W)")
    local zero_b = {0, 0}
    local ref3 = conv_ref({x1:tolist()}, c3.weight:tolist(), zero_b, 1, 1, 1, 5, 6)[1]
    T.close(y3, ref3, 1e-12, 1e-12, "Conv2d(bias=false, padding='same') unbatched vs loops")
end)

skip_unless({"conv2d", "conv3d"}, 1, "Conv3d forward", function()
    local x = rnd({2, 4, 1, 5, 6}, 31)
    local c3 = nn.Conv3d(4, 3, {1, 3, 3}, {padding = {0, 1, 1}, dtype = "float64"})
    local c2 = nn.Conv2d(4, 3, 3, {padding = 1, dtype = "float64"})
    nemo.no_grad(function()
        c2.weight:copy_(c3.weight:select(2, 0))
        c2.bias:copy_(c3.bias)
    end)
    T.close(c3(x):select(2, 0), c2(x:select(2, 0)), 1e-12, 1e-12, "Conv3d with depth-1 kernel on D=1 equals Conv2d")
end)

skip_unless({"embedding"}, 2, "Embedding forward", function()
    local emb = nn.Embedding(6, 3)
    local idx = nemo.tensor{{5, 0}, {2, 2}}
    local W = emb.weight:tolist()
    T.close(emb(idx), {{W[6], W[1]}, {W[3], W[3]}}, 0, 0, "Embedding picks rows (0-based indices)")
    local pe = nn.Embedding(4, 2, {padding_idx = 1})
    local y = pe(nemo.tensor{1, 3, 1, 0})
    y:backward(nemo.ones_like(y))
    T.close(pe.weight.grad, {{1, 1}, {0, 0}, {0, 0}, {1, 1}}, 0, 0, "Embedding(padding_idx=1): that row gets no gradient")
end)

skip_unless({"gelu", "silu"}, 2, "activation layers", function()
    local x = nemo.tensor({-2, -0.5, 0, 1, 3}, {dtype = "float64"})
    local xs = x:tolist()
    local gt, si = {}, {}
    for i, v in ipairs(xs) do
        gt[i] = 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ^ 3)))
        si[i] = v / (1 + math.exp(-v))
    end
    T.close(nn.GELU{approximate = "tanh"}(x), gt, 1e-12, 1e-12, "GELU(tanh) vs formula")
    T.close(nn.SiLU()(x), si, 1e-12, 1e-12, "SiLU vs formula")
end)

-- a tiny MLP trained with manual SGD reduces its MSE loss
skip_unless({"linear", F.mse_loss and "mse_loss" or "mean"}, 3, "MLP SGD", function()
    local mlp = nn.Sequential(nn.Linear(3, 16, {generator = nemo.Generator(5)}), nn.SiLU(),
                              nn.Linear(16, 1, {generator = nemo.Generator(6)}))
    local x = nemo.randn({32, 3}, {generator = nemo.Generator(7)})
    local X, tv = x:tolist(), {}
    for i = 1, 32 do tv[i] = {math.sin(X[i][1] + X[i][2] - X[i][3])} end
    local target = nemo.tensor(tv)
    local function loss_fn()
        local y = mlp(x)
        if F.mse_loss then return F.mse_loss(y, target) end
        local d = y - target
        return (d * d):mean()
    end
    local first, last
    for step = 1, 30 do
        local loss = loss_fn()
        if step == 1 then first = loss:item() end
        last = loss:item()
        mlp:zero_grad()
        loss:backward()
        nemo.no_grad(function()
            for _, p in ipairs(mlp:parameters()) do p:sub_(p.grad, {alpha = 0.1}) end
        end)
    end
    T.ok(last < 0.7 * first, string.format("MLP MSE after 30 SGD steps %.4f < 0.7 * initial %.4f", last, first))
    local all = true
    for _, p in ipairs(mlp:parameters()) do if p.grad == nil then all = false end end
    T.ok(all, "every MLP parameter received a gradient")
    if F.mse_loss and F.mean then
        local y = nemo.no_grad(function() return mlp(x) end)
        local d = y - target
        T.near(F.mse_loss(y, target):item(), (d * d):mean():item(), 1e-6, "F.mse_loss equals ((y-t)^2):mean() (tol 1e-6)")
    else
        T.skip("F.mse_loss equals ((y-t)^2):mean()", "needs both F.mse_loss and F.mean")
    end
end)

T.done()
