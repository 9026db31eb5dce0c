-- lua/nemo/peft.lua: LoRA finetuning (nemo.peft), as NeMo Automodel's components/_peft does it:
--   PeftConfig(d) / PeftConfig.from_dict(d)   the `peft:` block (dim 8, alpha 32, dropout 0, ...)
--   ModuleMatcher(cfg):match(name, is_linear)  which Linear layers get an adapter
--   apply_lora(model, cfg) -> count            replaces each matched nn.Linear by a LoRALinear
--   freeze_base(model) -> n                    requires_grad false for every non-lora_ parameter
--   lora_parameters(model) -> {{name, p}...}   the trainable adapter parameters
--   save_adapter(model, dir, cfg, {base=})     adapter_model.safetensors + adapter_config.json +
--                                              automodel_peft_config.json (Automodel's layout)
--   load_adapter(model, dir, {scale=})         applies LoRA as adapter_config.json says and loads
--   merge(model)                               folds every adapter into its base weight
--
-- LoRALinear keeps the Linear's weight and bias under their names (frozen) and adds lora_A
-- (dim x in) and lora_B (out x dim), so the state dict reads <fqn>.weight, <fqn>.bias,
-- <fqn>.lora_A.weight, <fqn>.lora_B.weight as in Automodel and PEFT. forward:
--   y = linear(x, W, b) + linear(linear(x, A) * scale, B),   scale = alpha / dim
-- (Automodel's memory-efficient path: the scale goes between the two products), with dropout on
-- the adapter's input ("pre") or output ("post", the default) in training. lora_A starts
-- xavier_normal ("uniform": kaiming_uniform a = sqrt(5)), lora_B zeros, so an adapted model
-- starts equal to its base. The adapter's weights are in lora_dtype (bfloat16 unless set, as
-- Automodel's diffusion path); an input of another dtype is cast for the adapter's products and
-- its result cast back.
--
-- Target patterns (Automodel's ModuleMatcher): a target matches a module's full name when equal to
-- it, or as an anchored regular expression after "*" not preceded by "." became ".*" (so "." is
-- any character, as in Python's re). Supported syntax: letters, digits, "_", ".", "*", "+", "?"
-- and [classes]; "|", "(", ")", "{", "\" are an error. target_modules and exclude_modules are
-- exclusive; neither and no match_all_linear means target_modules = {"*_proj"}.
local class = require "nemo.class"
local Tensor = require "nemo.tensor"
local F = require "nemo.functional"
local nn = require "nemo.nn"
local init = require "nemo.nn.init_fns"
local autograd = require "nemo.autograd"
local fs = require "nemo.fs"
local json = require "nemo.json"

local M = {}

local function warn(msg) io.stderr:write("nemo: warning: ", msg, "\n") end

-- ==== PeftConfig ====

local DEFAULTS = {target_modules = {}, exclude_modules = {}, match_all_linear = false, dim = 8, alpha = 32,
                  use_dora = false, dropout = 0.0, dropout_position = "post", lora_A_init = "xavier",
                  lora_dtype = nil, use_memory_efficient_lora = true, use_triton = false, moe_rank_scaling = false}
local KEYS = {"target_modules", "exclude_modules", "match_all_linear", "dim", "alpha", "use_dora", "dropout",
              "dropout_position", "lora_A_init", "lora_dtype", "use_memory_efficient_lora", "use_triton",
              "moe_rank_scaling"}
M.KEYS = KEYS

local function list_of_strings(v, key)
    if v == nil then return {} end
    if type(v) == "string" then return {v} end
    if type(v) ~= "table" then error(string.format("peft.%s: expected a list of module name patterns, got %s", key, type(v)), 0) end
    local out = {}
    for i, s in ipairs(v) do
        if type(s) ~= "string" then
            error(string.format("peft.%s[%d]: expected a module name pattern (a string), got %s", key, i, type(s)), 0)
        end
        out[i] = s
    end
    return out
end

local PeftConfig = class("nemo.peft.PeftConfig")
M.PeftConfig = PeftConfig

-- PeftConfig(d): d is the YAML block (its _target_ is accepted); unknown keys and wrong types
-- are errors naming the key.
function PeftConfig:__init(d)
    d = d or {}
    if type(d) ~= "table" then error("peft: expected a table of options, got " .. type(d), 0) end
    local known = {_target_ = true}
    for _, k in ipairs(KEYS) do known[k] = true end
    local unknown = {}
    for k in pairs(d) do if not known[k] then unknown[#unknown + 1] = tostring(k) end end
    if #unknown > 0 then
        table.sort(unknown)
        error(string.format("peft: unknown key%s %s (known keys: %s)", #unknown > 1 and "s" or "",
            table.concat(unknown, ", "), table.concat(KEYS, ", ")), 0)
    end
    for _, k in ipairs(KEYS) do
        local v = d[k]
        if v == nil then v = DEFAULTS[k] end
        self[k] = v
    end
    self.target_modules = list_of_strings(d.target_modules, "target_modules")
    self.exclude_modules = list_of_strings(d.exclude_modules, "exclude_modules")
    local function posint(k)
        local v = self[k]
        if type(v) ~= "number" or v < 1 or v % 1 ~= 0 then
            error(string.format("peft.%s: expected a positive integer, got %s", k, tostring(v)), 0)
        end
    end
    posint("dim")
    if type(self.alpha) ~= "number" or self.alpha ~= self.alpha then
        error("peft.alpha: expected a number, got " .. tostring(self.alpha), 0)
    end
    for _, k in ipairs{"match_all_linear", "use_dora", "use_memory_efficient_lora", "use_triton", "moe_rank_scaling"} do
        if type(self[k]) ~= "boolean" then error(string.format("peft.%s: expected true or false, got %s", k, tostring(self[k])), 0) end
    end
    if self.use_dora then error("peft.use_dora: DoRA is not available in nemo-lua yet; use plain LoRA (use_dora: false)", 0) end
    if type(self.dropout) ~= "number" or self.dropout < 0 or self.dropout >= 1 then
        error("peft.dropout: expected a probability in [0, 1), got " .. tostring(self.dropout), 0)
    end
    if self.dropout_position ~= "pre" and self.dropout_position ~= "post" then
        error("peft.dropout_position: expected 'pre' or 'post', got " .. tostring(self.dropout_position), 0)
    end
    if self.lora_A_init ~= "xavier" and self.lora_A_init ~= "uniform" then
        error("peft.lora_A_init: expected 'xavier' or 'uniform', got " .. tostring(self.lora_A_init), 0)
    end
    if self.lora_dtype ~= nil then
        local s = tostring(self.lora_dtype):gsub("^torch%.", "")
        local names = {bfloat16 = "bfloat16", bf16 = "bfloat16", float32 = "float32", fp32 = "float32", float = "float32",
                       float16 = "float16", fp16 = "float16", half = "float16", float64 = "float64"}
        if not names[s] then
            error("peft.lora_dtype: expected bfloat16, float16, float32 or float64, got " .. tostring(self.lora_dtype), 0)
        end
        self.lora_dtype = names[s]
    end
    -- the matcher's checks now, so a bad block fails before a model loads
    self.matcher = M.ModuleMatcher(self)
end
function PeftConfig.from_dict(d) return PeftConfig(d) end

-- The fields as Automodel's PeftConfig.to_dict() writes them (lora_dtype as "torch.<name>").
function PeftConfig:to_dict()
    local out = {}
    for _, k in ipairs(KEYS) do out[k] = self[k] end
    out.target_modules = json.array(self.target_modules)
    out.exclude_modules = json.array(self.exclude_modules)
    out.lora_dtype = self.lora_dtype and ("torch." .. self.lora_dtype) or json.null
    return out
end

-- ==== ModuleMatcher ====

local function to_lua_pattern(p, key)
    local bad = p:match("[|(){}\\^$%%]")
    if bad then
        error(string.format("peft.%s: pattern '%s' uses '%s', which nemo-lua's patterns do not support (use " ..
            "names, '.', '*', '+', '?' and [classes])", key, p, bad), 0)
    end
    -- Automodel: re.sub(r"(?<!\.)\*", ".*") then ".*" stays ".*"; anchored
    local out = p:gsub("()%*", function(i) return (i > 1 and p:sub(i - 1, i - 1) == ".") and "*" or ".*" end)
    out = out:gsub("%-", "%%-")
    return "^" .. out .. "$"
end

local ModuleMatcher = class("nemo.peft.ModuleMatcher")
M.ModuleMatcher = ModuleMatcher
function ModuleMatcher:__init(cfg)
    self.target_modules = list_of_strings(cfg.target_modules, "target_modules")
    self.exclude_modules = list_of_strings(cfg.exclude_modules, "exclude_modules")
    self.match_all_linear = cfg.match_all_linear or false
    if not self.match_all_linear and #self.target_modules == 0 and #self.exclude_modules == 0 then
        self.target_modules = {"*_proj"}
        self.defaulted = true
    end
    if #self.target_modules > 0 and #self.exclude_modules > 0 then
        error("peft: target_modules and exclude_modules are mutually exclusive; give only one of them", 0)
    end
    if self.match_all_linear and (#self.target_modules > 0 and not self.defaulted or #self.exclude_modules > 0) then
        error("peft: match_all_linear is true, so target_modules and exclude_modules must be empty", 0)
    end
    if self.match_all_linear then self.target_modules = {} end
    self.tpat, self.xpat = {}, {}
    for i, p in ipairs(self.target_modules) do self.tpat[i] = to_lua_pattern(p, "target_modules") end
    for i, p in ipairs(self.exclude_modules) do self.xpat[i] = to_lua_pattern(p, "exclude_modules") end
end

-- Does the module named name (its full dotted name) get an adapter? is_linear: it is a Linear.
function ModuleMatcher:match(name, is_linear)
    if self.match_all_linear then return is_linear end
    if #self.target_modules > 0 then
        for i, p in ipairs(self.target_modules) do
            if name == p or name:match(self.tpat[i]) then return true end
        end
        return false
    end
    for i, p in ipairs(self.exclude_modules) do
        if name == p or name:match(self.xpat[i]) then return false end
    end
    return is_linear
end

-- ==== LoRALinear ====

local LoRALinear = class("nemo.peft.LoRALinear", nn.Module)
M.LoRALinear = LoRALinear

-- LoRALinear(linear, {dim=, alpha=, dropout=, dropout_position=, lora_A_init=, lora_dtype=,
-- generator=}): linear's weight and bias (the same tensors, frozen) plus the adapter.
function LoRALinear:__init(linear, o)
    nn.Module.__init(self)
    o = o or {}
    self.in_features, self.out_features = linear.in_features, linear.out_features
    self:register_parameter("weight", linear.weight)
    self:register_parameter("bias", linear.bias)
    linear.weight:requires_grad_(false)
    if linear.bias then linear.bias:requires_grad_(false) end
    local dim = o.dim or 8
    local dtype = o.lora_dtype or linear.weight.dtype
    local fo = {dtype = dtype, device = linear.weight.device, bias = false}
    self.lora_A = nn.Linear(self.in_features, dim, fo)
    self.lora_B = nn.Linear(dim, self.out_features, fo)
    autograd.no_grad(function()
        if (o.lora_A_init or "xavier") == "xavier" then
            init.xavier_normal_(self.lora_A.weight, {generator = o.generator})
        else
            init.kaiming_uniform_(self.lora_A.weight, {a = math.sqrt(5), generator = o.generator})
        end
        self.lora_B.weight:zero_()
    end)
    rawset(self, "dim", dim)
    rawset(self, "alpha", o.alpha or 32)
    rawset(self, "scale", (o.alpha or 32) / dim)
    rawset(self, "dropout_p", o.dropout or 0)
    rawset(self, "dropout_position", o.dropout_position or "post")
    rawset(self, "_drop", nn.Dropout(o.dropout or 0, {generator = o.generator}))
end

local function dropout(self, x)
    local d = rawget(self, "_drop")
    if self.dropout_p == 0 or not self.training then return x end
    d.training = true
    return d:forward(x)
end

function LoRALinear:forward(x)
    local res = F.linear(x, self.weight, self.bias)
    local xa = x
    if self.dropout_position == "pre" then xa = dropout(self, xa) end
    local ldt = self.lora_A.weight.dtype
    local cast = xa.dtype ~= ldt
    if cast then xa = xa:to{dtype = ldt} end
    local h = F.linear(xa, self.lora_A.weight)
    local lora = F.linear(h * self.scale, self.lora_B.weight)
    if cast then lora = lora:to{dtype = res.dtype} end
    if self.dropout_position == "post" then lora = dropout(self, lora) end
    return lora + res
end
function LoRALinear:extra_repr()
    return string.format("in_features=%d, out_features=%d, bias=%s, dim=%d, alpha=%s", self.in_features,
        self.out_features, tostring(self.bias ~= nil), self.dim, tostring(self.alpha))
end

-- ==== applying, freezing, saving, loading ====

local function is_linear(m) return class.isinstance(m, nn.Linear) end

-- The parent module and attribute name of the module called fqn.
local function parent_of(model, fqn)
    local parent_name, child = fqn:match("^(.*)%.([^%.]+)$")
    if not parent_name then return model, fqn end
    return model:get_submodule(parent_name), child
end

-- apply_lora(model, cfg, {generator=, names=}) -> the number of Linear layers adapted. cfg: a
-- PeftConfig (or its table). names: adapt exactly the Linear layers of these full names instead
-- of the ones cfg's patterns match. Layers already adapted are left as they are.
function M.apply_lora(model, cfg, o)
    o = o or {}
    if getmetatable(cfg) ~= PeftConfig then cfg = PeftConfig(cfg) end
    local matcher = cfg.matcher
    local exact
    if o.names then
        exact = {}
        for _, n in ipairs(o.names) do exact[n] = true end
    elseif matcher.defaulted then
        warn("peft: no target_modules, exclude_modules or match_all_linear given: adapting the Linear layers " ..
            "named '*_proj' (Automodel's default)")
    end
    local todo = {}
    for name, m in model:named_modules() do
        if name ~= "" and is_linear(m) and (exact and exact[name] or (not exact and matcher:match(name, true))) then
            todo[#todo + 1] = {name, m}
        end
    end
    for _, e in ipairs(todo) do
        local parent, child = parent_of(model, e[1])
        local l = LoRALinear(e[2], {dim = cfg.dim, alpha = cfg.alpha, dropout = cfg.dropout,
            dropout_position = cfg.dropout_position, lora_A_init = cfg.lora_A_init,
            lora_dtype = cfg.lora_dtype or "bfloat16", generator = o.generator})
        l.training = e[2].training
        parent:add_module(child, l)
    end
    rawset(model, "_peft_config", cfg)
    return #todo
end

local function is_lora_name(name) return name:find("lora_", 1, true) ~= nil end

-- Every parameter whose name has no "lora_" stops requiring grad; returns how many were frozen.
function M.freeze_base(model)
    local n = 0
    for name, p in model:named_parameters() do
        if not is_lora_name(name) and rawget(p, "requires_grad") then p:requires_grad_(false); n = n + 1 end
    end
    return n
end

function M.lora_parameters(model)
    local out = {}
    for name, p in model:named_parameters() do
        if is_lora_name(name) and rawget(p, "requires_grad") then out[#out + 1] = {name, p} end
    end
    return out
end

-- The full names of the adapted layers, sorted.
function M.adapted_modules(model)
    local out = {}
    for name, m in model:named_modules() do
        if class.isinstance(m, LoRALinear) then out[#out + 1] = name end
    end
    table.sort(out)
    return out
end

local PREFIX = "base_model.model."

-- save_adapter(model, dir, cfg, {base = "path or id"}): Automodel's PEFT checkpoint files in dir
-- (created): adapter_model.safetensors holding only the lora_ tensors under
-- "base_model.model.<fqn>", adapter_config.json (HF PEFT's fields) and automodel_peft_config.json.
-- lora_tensors: name -> tensor to write instead of the model's own (FSDP2's gathered shards).
function M.save_adapter(model, dir, cfg, o)
    o = o or {}
    cfg = cfg or rawget(model, "_peft_config")
    if not cfg then error("save_adapter: the model has no LoRA config (apply_lora first)", 2) end
    local tensors = {}
    if o.lora_tensors then
        for k, v in pairs(o.lora_tensors) do tensors[PREFIX .. k] = v end
    else
        local sd, keys = model:state_dict()
        for _, k in ipairs(keys) do if is_lora_name(k) then tensors[PREFIX .. k] = sd[k] end end
    end
    if next(tensors) == nil then error("save_adapter: the model has no LoRA parameters", 2) end
    fs.mkdirs(dir)
    require("nemo.safetensors").save_file(tensors, dir .. "/adapter_model.safetensors", {format = "pt"})
    json.write_file(dir .. "/adapter_config.json", {task_type = "CAUSAL_LM", peft_type = "LORA", r = cfg.dim,
        lora_alpha = cfg.alpha, use_dora = false, target_modules = json.array(M.adapted_modules(model)), bias = "none",
        base_model_name_or_path = o.base or "N/A"})
    local meta = cfg:to_dict()
    meta.dim, meta.alpha = nil, nil
    json.write_file(dir .. "/automodel_peft_config.json", meta)
end

-- load_adapter(model, dir, {scale=1}) -> the PeftConfig used. Reads dir/adapter_config.json
-- (r -> dim, lora_alpha -> alpha; automodel_peft_config.json's other fields when present),
-- adapts exactly the modules it lists (unless the model already has adapters), and loads
-- adapter_model.safetensors: a missing or unexpected lora_ tensor is an error. scale multiplies
-- the adapters' contribution (diffusers' lora_scale).
function M.load_adapter(model, dir, o)
    o = o or {}
    local cpath = dir .. "/adapter_config.json"
    if not fs.isfile(cpath) then error("load_adapter: no adapter_config.json in " .. dir, 2) end
    local ac = json.read_file(cpath)
    if ac.peft_type and ac.peft_type ~= "LORA" then
        error(string.format("load_adapter: %s: peft_type %s, only LORA is supported", cpath, tostring(ac.peft_type)), 2)
    end
    if ac.use_dora then error("load_adapter: " .. cpath .. " is a DoRA adapter; DoRA is not available in nemo-lua yet", 2) end
    local d = {}
    local mpath = dir .. "/automodel_peft_config.json"
    if fs.isfile(mpath) then
        for k, v in pairs(json.read_file(mpath)) do
            if k ~= "target_modules" and k ~= "exclude_modules" and k ~= "match_all_linear" and v ~= json.null then d[k] = v end
        end
    end
    d.dim, d.alpha = ac.r, ac.lora_alpha
    if type(ac.target_modules) ~= "table" or #ac.target_modules == 0 then
        error("load_adapter: " .. cpath .. " lists no target_modules", 2)
    end
    d.target_modules = ac.target_modules
    local known = {_target_ = true}
    for _, k in ipairs(KEYS) do known[k] = true end
    for k in pairs(d) do if not known[k] then d[k] = nil end end
    local cfg = PeftConfig(d)
    if #M.adapted_modules(model) == 0 then
        -- exactly the modules listed: a name that is not a Linear of this model is an error
        local names = {}
        for name, m in model:named_modules() do names[name] = m end
        for _, t in ipairs(ac.target_modules) do
            if not names[t] then error(string.format("load_adapter: %s names module %s, which this model does not have",
                cpath, t), 2) end
            if not is_linear(names[t]) then error(string.format("load_adapter: %s: module %s is not a Linear", cpath, t), 2) end
        end
        M.apply_lora(model, cfg, {names = ac.target_modules})
    end
    local wpath = dir .. "/adapter_model.safetensors"
    if not fs.isfile(wpath) then error("load_adapter: no adapter_model.safetensors in " .. dir, 2) end
    local w = require("nemo.safetensors").load_file(wpath)
    local sd, keys = model:state_dict{keep_vars = true}
    local missing, unexpected = {}, {}
    local want = {}
    for _, k in ipairs(keys) do if is_lora_name(k) then want[k] = true end end
    local src = {}
    for k, v in pairs(w) do
        local name = k:sub(1, #PREFIX) == PREFIX and k:sub(#PREFIX + 1) or k
        if want[name] then src[name] = v else unexpected[#unexpected + 1] = k end
    end
    for k in pairs(want) do if not src[k] then missing[#missing + 1] = k end end
    table.sort(missing); table.sort(unexpected)
    if #missing > 0 or #unexpected > 0 then
        error(string.format("load_adapter: %s does not fit the model's adapters:%s%s", wpath,
            #missing > 0 and (" missing " .. table.concat(missing, ", ")) or "",
            #unexpected > 0 and (" unexpected " .. table.concat(unexpected, ", ")) or ""), 2)
    end
    autograd.no_grad(function()
        for k, v in pairs(src) do
            if table.concat(v.shape, ",") ~= table.concat(sd[k].shape, ",") then
                error(string.format("load_adapter: %s: %s has shape (%s), the model's adapter (%s)", wpath, k,
                    table.concat(v.shape, ", "), table.concat(sd[k].shape, ", ")), 3)
            end
            sd[k]:copy_(v)
        end
    end)
    if o.scale and o.scale ~= 1 then
        for _, name in ipairs(M.adapted_modules(model)) do
            local m = model:get_submodule(name)
            rawset(m, "scale", m.scale * o.scale)
        end
    end
    return cfg
end

-- merge(model) -> count: W += scale * B A in W's dtype for every adapter, which is then removed
-- (the layer becomes a plain nn.Linear again): a model for inference, or for save_pretrained in
-- diffusers' layout.
function M.merge(model)
    local names = M.adapted_modules(model)
    for _, name in ipairs(names) do
        local m = model:get_submodule(name)
        autograd.no_grad(function()
            local w = m.weight
            local cdt = w.dtype == "float64" and "float64" or "float32"   -- summed in float32 at least
            local a, b = m.lora_A.weight:to{dtype = cdt}, m.lora_B.weight:to{dtype = cdt}
            local merged = (w:to{dtype = cdt} + b:matmul(a) * m.scale):to{dtype = w.dtype}
            w:copy_(merged)
        end)
        -- the same module becomes a plain Linear again (no new weight is allocated)
        m:add_module("lora_A", nil)
        m:add_module("lora_B", nil)
        setmetatable(m, nn.Linear)
    end
    return #names
end

return M
