-- lua/nemo/nn/module.lua: nn.Module, the base of every layer and model (torch.nn.Module
-- semantics), and nn.Parameter.
--
-- The non-obvious rule: parameters, buffers and children are NOT stored as raw fields of the
-- instance. They live in self._vals (name -> value) with one ordered name list per kind, and the
-- class's __index / __newindex (installed on the instance's class by Module.__init) route
-- `self.to_q` and `self.to_q = nn.Linear(...)` through that registry. So a plain assignment of a
-- Module or an nn.Parameter registers it in order, reassigning replaces it in place, and the
-- registry is always the truth. Methods win over registered names (as in torch), and
-- registering a name that is a method is refused. A name first assigned a plain value (number,
-- function, plain tensor) stays a plain raw field; a later Module assigned to that same name is
-- then NOT registered (Lua only calls __newindex for absent keys): use add_module for it.
--
-- Orders follow torch exactly: named_modules is pre-order; named_parameters/named_buffers list
-- each module's own entries (registration order) before its children's, shared tensors once;
-- state_dict lists own parameters, own persistent buffers, then children, shared ones under
-- every name. state_dict() returns two values: sd (name -> detached tensor) and keys (the names
-- in that order), since LuaJIT tables have no order and no __pairs.
local ffi = require "ffi"
local class = require "nemo.class"
local nffi = require "nemo.ffi"
local Tensor = require "nemo.tensor"
local autograd = require "nemo.autograd"

local C = nffi.C
local is_tensor = Tensor.is_tensor
local shape_str = Tensor.shape_str

local Module = class("nemo.nn.Module")

-- ==== errors ====

-- Frames of the library itself (nemo's Lua files) and C frames are skipped, so an error points
-- at the user's line that called into nn, however deep inside nn it was detected.
local function library_frame(src)
    return src == "=[C]" or src:find("[/@]nemo/nn/") ~= nil or src:find("[/@]nemo/ops/") ~= nil
        or src:find("[/@]nemo/[%w_]+%.lua$") ~= nil
end
local function raise(msg)
    local level = 2
    while true do
        local info = debug.getinfo(level, "S")
        if info == nil then error(msg, 0) end
        if not library_frame(info.source) then error(msg, level) end
        level = level + 1
    end
end
Module._raise = raise

-- ==== Parameter ====

local function is_parameter(t) return is_tensor(t) and rawget(t, "_is_param") == true end

-- nn.Parameter(t, requires_grad=true): a new tensor handle sharing t's storage, marked as a
-- parameter (a leaf). Plain assignment of one to a module field registers it.
local function Parameter(t, requires_grad)
    if not is_tensor(t) then raise("nn.Parameter: expected a tensor, got " .. type(t)) end
    local p = t:detach()
    rawset(p, "_is_param", true)
    if requires_grad ~= false then
        if not p:is_floating_point() then
            raise("nn.Parameter: only floating point tensors can require gradients (dtype " .. p.dtype ..
                "); pass requires_grad=false")
        end
        p:requires_grad_(true)
    end
    return p
end

-- ==== helpers ====

local function class_name(self)
    local mt = getmetatable(self)
    local name = mt and rawget(mt, "__name") or "Module"
    return (name:match("([^%.]+)$"))
end
Module._get_name = class_name

local function state(self, what)
    local vals = rawget(self, "_vals")
    if vals == nil then
        raise(string.format("%s: Module.__init was not called (call parent.__init(self) first in __init)",
            class_name(self) .. (what and (":" .. what) or "")))
    end
    return vals
end

local function remove_name(list, name)
    for i = 1, #list do
        if list[i] == name then table.remove(list, i); return end
    end
end

local function check_name(self, name, what)
    if type(name) ~= "string" then
        raise(string.format("%s: name must be a string, got %s", what, type(name)))
    end
    if name == "" then raise(what .. ": name cannot be empty") end
    if name:find(".", 1, true) then raise(string.format("%s: name '%s' cannot contain '.'", what, name)) end
    local cls = getmetatable(self)
    if cls[name] ~= nil then
        raise(string.format("%s: name '%s' conflicts with a method or class field of %s", what, name,
            class_name(self)))
    end
    local k = rawget(self, "_kind")[name]
    if rawget(self, name) ~= nil and k == nil then
        raise(string.format("%s: attribute '%s' already exists as a plain field of %s", what, name,
            class_name(self)))
    end
    return k
end

-- Put name into `kind` (keeping its place when it already is of that kind).
local function put(self, name, kind, value)
    local kinds = rawget(self, "_kind")
    local cur = kinds[name]
    if cur ~= kind then
        if cur ~= nil then remove_name(rawget(self, "_" .. cur .. "_names"), name) end
        local list = rawget(self, "_" .. kind .. "_names")
        list[#list + 1] = name
        kinds[name] = kind
    end
    if kind ~= "buffer" then rawget(self, "_non_persistent")[name] = nil end
    rawget(self, "_vals")[name] = value
end

local function is_module(v) return class.isinstance(v, Module) end

-- ==== instance access: installed on each Module class on first construction ====

local function module_newindex(self, k, v)
    local kinds = rawget(self, "_kind")
    if kinds == nil or type(k) ~= "string" then
        local f = type(k) == "number" and getmetatable(self)._set_number
        if f then return f(self, k, v) end
        return rawset(self, k, v)
    end
    local kind = kinds[k]
    if is_module(v) then
        return self:add_module(k, v)
    elseif is_parameter(v) then
        return self:register_parameter(k, v)
    elseif kind == "param" then
        if v ~= nil then
            raise(string.format("%s: cannot assign a %s as parameter '%s' (nn.Parameter or nil expected; use " ..
                "%s.%s:copy_(t) to change its values)", class_name(self), is_tensor(v) and "plain tensor" or type(v),
                k, "self", k))
        end
        rawget(self, "_vals")[k] = nil
    elseif kind == "buffer" then
        if v ~= nil and not is_tensor(v) then
            raise(string.format("%s: cannot assign a %s as buffer '%s' (tensor or nil expected)",
                class_name(self), type(v), k))
        end
        rawget(self, "_vals")[k] = v
    elseif kind == "module" then
        if v ~= nil then
            raise(string.format("%s: cannot assign a %s as child module '%s' (nn.Module or nil expected)",
                class_name(self), type(v), k))
        end
        rawget(self, "_vals")[k] = nil
    else
        rawset(self, k, v)
    end
end

local function prepare_class(cls)
    if rawget(cls, "__nn_ready") then return end
    rawset(cls, "__index", function(self, k)
        local v = cls[k]
        if v ~= nil then return v end
        local vals = rawget(self, "_vals")
        if vals ~= nil then
            v = vals[k]
            if v ~= nil then return v end
        end
        if type(k) == "number" then
            local f = cls._get_number
            if f then return f(self, k) end
        end
        return nil
    end)
    rawset(cls, "__newindex", module_newindex)
    rawset(cls, "__nn_ready", true)
end

-- ==== construction and registration ====

function Module:__init()
    prepare_class(getmetatable(self))
    rawset(self, "_vals", {})
    rawset(self, "_kind", {})
    rawset(self, "_param_names", {})
    rawset(self, "_buffer_names", {})
    rawset(self, "_module_names", {})
    rawset(self, "_non_persistent", {})
    rawset(self, "training", true)
end

-- register_parameter(name, t): t is an nn.Parameter, a plain tensor (made a parameter in place:
-- it must be a leaf; floating tensors get requires_grad) or nil (a slot with no value, as
-- torch's register_parameter(name, None): skipped by named_parameters and state_dict).
function Module:register_parameter(name, t)
    state(self, "register_parameter")
    local kind = check_name(self, name, class_name(self) .. ":register_parameter")
    if kind ~= nil and kind ~= "param" then
        raise(string.format("%s:register_parameter: '%s' is already a %s", class_name(self), name,
            kind == "module" and "child module" or kind))
    end
    if t ~= nil then
        if not is_tensor(t) then
            raise(string.format("%s:register_parameter: '%s' must be a tensor or nil, got %s",
                class_name(self), name, type(t)))
        end
        if not is_parameter(t) then
            if rawget(t, "grad_fn") ~= nil then
                raise(string.format("%s:register_parameter: '%s' is not a leaf tensor (it has grad_fn %s); " ..
                    "register t:detach() or nn.Parameter(t)", class_name(self), name, t.grad_fn.name))
            end
            rawset(t, "_is_param", true)
            if t:is_floating_point() then t:requires_grad_(true) end
        end
    end
    put(self, name, "param", t)
    return t
end

-- m:_substitute_params(subs, fn, ...) -> fn(...)'s results: while fn runs, m's own parameters
-- named in subs (name -> tensor) read as those tensors (a differentiable stand-in for the
-- parameter, e.g. tensor parallelism's alias whose backward sums the gradient over ranks); the
-- parameters are back in place afterwards, also when fn raises.
function Module:_substitute_params(subs, fn, ...)
    local vals, kinds = rawget(self, "_vals"), rawget(self, "_kind")
    local saved = {}
    for name, t in pairs(subs) do
        if kinds[name] ~= "param" then raise(class_name(self) .. ":_substitute_params: no parameter '" .. name .. "'") end
        saved[name] = vals[name]
        vals[name] = t
    end
    local res = {n = 0}
    local function run(...) res = {n = select("#", ...), ...} end
    local ok, err = pcall(function(...) run(fn(...)) end, ...)
    for name, v in pairs(saved) do vals[name] = v end
    if not ok then error(err, 0) end
    return unpack(res, 1, res.n)
end

-- register_buffer(name, t, {persistent=true}): a tensor that is state but not a parameter
-- (moved by :to, saved by state_dict unless persistent=false).
function Module:register_buffer(name, t, opts)
    state(self, "register_buffer")
    local kind = check_name(self, name, class_name(self) .. ":register_buffer")
    if kind ~= nil and kind ~= "buffer" then
        raise(string.format("%s:register_buffer: '%s' is already a %s", class_name(self), name,
            kind == "module" and "child module" or "parameter"))
    end
    if t ~= nil and not is_tensor(t) then
        raise(string.format("%s:register_buffer: '%s' must be a tensor or nil, got %s", class_name(self),
            name, type(t)))
    end
    put(self, name, "buffer", t)
    local persistent = not (type(opts) == "table" and opts.persistent == false) and opts ~= false
    rawget(self, "_non_persistent")[name] = (not persistent) or nil
    return t
end

-- add_module(name, m) (also register_module): m is a Module or nil.
function Module:add_module(name, m)
    state(self, "add_module")
    local kind = check_name(self, name, class_name(self) .. ":add_module")
    if m ~= nil and not is_module(m) then
        raise(string.format("%s:add_module: '%s' must be an nn.Module or nil, got %s", class_name(self),
            name, type(m)))
    end
    if kind ~= nil and kind ~= "module" then
        rawget(self, "_vals")[name] = nil
    end
    put(self, name, "module", m)
    return m
end
Module.register_module = Module.add_module

-- ==== forward ====

function Module:forward()
    raise(string.format("%s: forward is not implemented (define function %s:forward(...))",
        class_name(self), class_name(self)))
end

function Module:__call(...) return self:forward(...) end

-- ==== traversal ====

-- Own registered entries of one kind, in order, skipping nil slots: array of {name, value}.
local function own(self, kind)
    local vals = state(self)
    local out = {}
    for _, name in ipairs(rawget(self, "_" .. kind .. "_names")) do
        local v = vals[name]
        if v ~= nil then out[#out + 1] = {name, v} end
    end
    return out
end

local function iter_pairs(list)
    local i = 0
    return function()
        i = i + 1
        local e = list[i]
        if e then return e[1], e[2] end
    end
end

local function join(prefix, name)
    if prefix == "" then return name end
    return prefix .. "." .. name
end

-- Pre-order list of {name, module}; duplicates (the same module under two names) once unless
-- remove_duplicate == false.
local function collect_modules(self, prefix, remove_duplicate)
    local out, memo = {}, {}
    local function walk(m, p)
        if remove_duplicate then
            if memo[m] then return end
            memo[m] = true
        end
        out[#out + 1] = {p, m}
        for _, e in ipairs(own(m, "module")) do walk(e[2], join(p, e[1])) end
    end
    walk(self, prefix)
    return out
end

local function opt(opts, k, default)
    if type(opts) == "table" and opts[k] ~= nil then return opts[k] end
    return default
end

-- for name, m in self:named_modules{prefix=, remove_duplicate=true} (self comes first, name "")
function Module:named_modules(opts)
    state(self, "named_modules")
    return iter_pairs(collect_modules(self, opt(opts, "prefix", ""), opt(opts, "remove_duplicate", true)))
end
-- Array of every module in the tree, self first.
function Module:modules()
    local out = {}
    for _, e in ipairs(collect_modules(self, "", true)) do out[#out + 1] = e[2] end
    return out
end
-- for name, m in self:named_children() (direct children, nil slots skipped)
function Module:named_children()
    return iter_pairs(own(self, "module"))
end
function Module:children()
    local out = {}
    for _, e in ipairs(own(self, "module")) do out[#out + 1] = e[2] end
    return out
end

local function collect_members(self, kind, opts)
    local prefix = opt(opts, "prefix", "")
    local recurse = opt(opts, "recurse", true)
    local remove_duplicate = opt(opts, "remove_duplicate", true)
    local mods = recurse and collect_modules(self, prefix, remove_duplicate) or {{prefix, self}}
    local out, seen = {}, {}
    for _, me in ipairs(mods) do
        for _, e in ipairs(own(me[2], kind)) do
            local t = e[2]
            if not (remove_duplicate and seen[t]) then
                seen[t] = true
                out[#out + 1] = {join(me[1], e[1]), t}
            end
        end
    end
    return out
end

-- for name, p in self:named_parameters{prefix=, recurse=true, remove_duplicate=true}
-- Names are dotted paths ("transformer_blocks.0.attn.to_q.weight").
function Module:named_parameters(opts)
    state(self, "named_parameters")
    return iter_pairs(collect_members(self, "param", opts))
end
-- Array of parameters (same order as named_parameters).
function Module:parameters(opts)
    state(self, "parameters")
    local out = {}
    for i, e in ipairs(collect_members(self, "param", opts)) do out[i] = e[2] end
    return out
end
-- for name, b in self:named_buffers{...}: every buffer, persistent or not.
function Module:named_buffers(opts)
    state(self, "named_buffers")
    return iter_pairs(collect_members(self, "buffer", opts))
end
function Module:buffers(opts)
    state(self, "buffers")
    local out = {}
    for i, e in ipairs(collect_members(self, "buffer", opts)) do out[i] = e[2] end
    return out
end

-- Number of parameter elements (shared ones once); {only_trainable=true} counts those that
-- require grad.
function Module:num_parameters(opts)
    local n = 0
    local only = opt(opts, "only_trainable", false)
    for _, p in ipairs(self:parameters()) do
        if not only or rawget(p, "requires_grad") then n = n + p:numel() end
    end
    return n
end

-- The module at a dotted path ("transformer_blocks.3.attn"); "" is self.
function Module:get_submodule(path)
    if path == "" then return self end
    local m = self
    local walked = {}
    for part in path:gmatch("[^%.]+") do
        local kinds = rawget(m, "_kind")
        if kinds == nil or kinds[part] ~= "module" or rawget(m, "_vals")[part] == nil then
            raise(string.format("get_submodule: %s has no child module '%s' (path '%s')",
                #walked == 0 and class_name(self) or table.concat(walked, "."), part, path))
        end
        m = rawget(m, "_vals")[part]
        walked[#walked + 1] = part
    end
    return m
end

-- The parameter or buffer at a dotted path ("blocks.0.attn.to_q.weight").
function Module:get_parameter(path)
    local mpath, name = path:match("^(.*)%.([^%.]+)$")
    if not mpath then mpath, name = "", path end
    local m = self:get_submodule(mpath)
    local kind = rawget(m, "_kind")[name]
    if kind ~= "param" and kind ~= "buffer" then
        raise(string.format("get_parameter: %s has no parameter or buffer '%s' (path '%s')", class_name(m), name, path))
    end
    return rawget(m, "_vals")[name]
end

-- ==== modes and in-place conversions ====

-- train(mode=true) / eval(): set .training on every module; returns self.
function Module:train(mode)
    if mode == nil then mode = true end
    for _, m in ipairs(self:modules()) do rawset(m, "training", not not mode) end
    return self
end
function Module:eval() return self:train(false) end

-- apply(fn): fn(m) for every module, children first then self (as torch); returns self.
function Module:apply(fn)
    for _, c in ipairs(self:children()) do c:apply(fn) end
    fn(self)
    return self
end

-- requires_grad_(on=true) on every parameter; returns self.
function Module:requires_grad_(on)
    if on == nil then on = true end
    for _, p in ipairs(self:parameters()) do
        if p:is_floating_point() or not on then p:requires_grad_(on) end
    end
    return self
end

-- zero_grad(): drop every parameter's .grad ({set_to_none=false}: fill it with zeros instead).
function Module:zero_grad(opts)
    local to_none = opt(opts, "set_to_none", true)
    for _, p in ipairs(self:parameters()) do
        local g = rawget(p, "grad")
        if g ~= nil then
            if to_none then
                rawset(p, "grad", nil)
                rawset(p, "_grad_owned", nil)
            else
                autograd.no_grad(function() g:zero_() end)
            end
        end
    end
end

-- Replace t's data with new's (same Lua object, so requires_grad, optimizer references and
-- parameter slots stay valid); the old engine handle is released at once.
local function swap_data(t, new)
    local old = rawget(t, "_c")
    local nc = rawget(new, "_c")
    if nc == old then return end
    rawset(t, "_c", nc)
    rawset(new, "_c", nil)
    ffi.gc(old, nil)
    C.nemo_tensor_release(old)
end

local function convert(t, dtype, device)
    local dt = (dtype and t:is_floating_point()) and dtype or t.dtype
    local dev = device or t.device
    if dt == t.dtype and dev == t.device then return end
    -- under no_grad, to() records nothing and makes no extra handle on the old storage, so
    -- swap_data's release frees the old memory at once
    local new = autograd.no_grad(function() return t:to{dtype = dt, device = dev, copy = true} end)
    swap_data(t, new)
    local g = rawget(t, "grad")
    if g ~= nil then
        rawset(t, "grad", autograd.no_grad(function() return g:to{dtype = dt, device = dev, copy = true} end))
    end
end

-- to{dtype=, device=} (also to("float64"), to("cuda:0")): converts parameters and buffers in
-- place (dtype only changes floating point tensors, as in torch); returns self.
function Module:to(opts)
    if type(opts) == "string" then
        if Tensor.dtype_ids[opts] ~= nil or C.nemo_dtype_from_name(opts) >= 0 then opts = {dtype = opts}
        else opts = {device = opts} end
    end
    if type(opts) ~= "table" then raise(class_name(self) .. ":to: expected {dtype=, device=} or a string") end
    local dtype = opts.dtype and Tensor.dtype_names[Tensor.dtype_id(opts.dtype, "to")]
    local device = opts.device
    if device then
        local dt, di = Tensor.parse_device(device, "to")
        device = dt == 0 and "cpu" or ("cuda:" .. di)
    end
    local seen = {}
    for _, m in ipairs(self:modules()) do
        for _, kind in ipairs { "param", "buffer" } do
            for _, e in ipairs(own(m, kind)) do
                local t = e[2]
                if not seen[t] then
                    seen[t] = true
                    convert(t, dtype, device)
                end
            end
        end
    end
    return self
end
function Module:float() return self:to{dtype = "float32"} end
function Module:double() return self:to{dtype = "float64"} end
function Module:bfloat16() return self:to{dtype = "bfloat16"} end
function Module:half() return self:to{dtype = "float16"} end
function Module:cpu() return self:to{device = "cpu"} end
function Module:cuda(idx) return self:to{device = "cuda:" .. (idx or 0)} end

-- ==== state dict ====

-- sd, keys = self:state_dict{prefix=, keep_vars=false}: sd maps names to detached tensors
-- sharing storage with the parameters and persistent buffers; keys lists the names in order.
function Module:state_dict(opts)
    state(self, "state_dict")
    local keep = opt(opts, "keep_vars", false)
    local sd, keys = {}, {}
    local function walk(m, prefix)
        local np = rawget(m, "_non_persistent")
        for _, kind in ipairs { "param", "buffer" } do
            for _, e in ipairs(own(m, kind)) do
                if not np[e[1]] or kind == "param" then
                    local name = join(prefix, e[1])
                    if sd[name] == nil then keys[#keys + 1] = name end
                    sd[name] = keep and e[2] or e[2]:detach()
                end
            end
        end
        for _, e in ipairs(own(m, "module")) do walk(e[2], join(prefix, e[1])) end
    end
    walk(self, opt(opts, "prefix", ""))
    return sd, keys
end

local function same_shape(a, b)
    if #a ~= #b then return false end
    for i = 1, #a do if a[i] ~= b[i] then return false end end
    return true
end

-- load_state_dict(sd, {strict=true, assign=false}): copies sd's tensors into the parameters and
-- persistent buffers in place (dtype and device converted; shapes must match). Nothing is
-- copied unless every check passes. strict: missing and unexpected keys are errors (all of them
-- listed in one message, with every shape mismatch); strict=false returns {missing_keys=,
-- unexpected_keys=} (missing in state_dict order, unexpected sorted; shape mismatches are still
-- an error). assign=true makes each parameter/buffer share the checkpoint tensor's memory
-- instead of copying (its dtype and device too; the Lua object and requires_grad stay): no
-- second copy of a memory-mapped safetensors file.
function Module:load_state_dict(sd, opts)
    if type(sd) ~= "table" then raise(class_name(self) .. ":load_state_dict: expected a table name -> tensor") end
    local strict = opt(opts, "strict", true)
    local assign = opt(opts, "assign", false)
    local own_sd, keys = self:state_dict{keep_vars = true}
    local missing, unexpected, problems = {}, {}, {}
    for _, k in ipairs(keys) do
        local src = sd[k]
        if src == nil then
            missing[#missing + 1] = k
        elseif not is_tensor(src) then
            problems[#problems + 1] = string.format("value for %s is a %s, not a tensor", k, type(src))
        elseif not same_shape(src.shape, own_sd[k].shape) then
            problems[#problems + 1] = string.format("shape mismatch for %s: checkpoint %s vs model %s", k,
                shape_str(src.shape), shape_str(own_sd[k].shape))
        elseif assign and rawget(own_sd[k], "requires_grad") and not src:is_floating_point() then
            problems[#problems + 1] = string.format("%s requires grad but the checkpoint's dtype is %s", k, src.dtype)
        end
    end
    for k in pairs(sd) do
        if own_sd[k] == nil then unexpected[#unexpected + 1] = tostring(k) end
    end
    table.sort(unexpected)
    local parts = {}
    if strict and #missing > 0 then parts[#parts + 1] = "missing keys: " .. table.concat(missing, ", ") end
    if strict and #unexpected > 0 then parts[#parts + 1] = "unexpected keys: " .. table.concat(unexpected, ", ") end
    for _, p in ipairs(problems) do parts[#parts + 1] = p end
    if #parts > 0 then
        raise(string.format("%s:load_state_dict: %s", class_name(self), table.concat(parts, "; ")))
    end
    autograd.no_grad(function()
        for _, k in ipairs(keys) do
            local src = sd[k]
            if src ~= nil then
                local dst = own_sd[k]
                if assign then
                    swap_data(dst, src:detach())
                elseif rawget(src, "_c") ~= rawget(dst, "_c") then
                    dst:copy_(src)
                end
            end
        end
    end)
    return {missing_keys = missing, unexpected_keys = unexpected}
end

-- ==== printing ====

-- extra_repr(): the text inside "Name(...)" for a leaf layer; subclasses override it.
function Module:extra_repr() return "" end

local function addindent(s, n)
    local pad = string.rep(" ", n)
    return (s:gsub("\n", "\n" .. pad))
end
Module._addindent = addindent

-- torch's format: "Linear(in_features=4, out_features=8, bias=true)"; containers put one
-- "(name): child" line per child, indented by two spaces.
function Module:__tostring()
    if rawget(self, "_vals") == nil then return class_name(self) .. "(<not initialised>)" end
    local extra = self:extra_repr()
    local lines = {}
    if extra ~= "" then for l in (extra .. "\n"):gmatch("(.-)\n") do lines[#lines + 1] = l end end
    local nextra = #lines
    for _, name in ipairs(rawget(self, "_module_names")) do
        local m = rawget(self, "_vals")[name]
        lines[#lines + 1] = "(" .. name .. "): " .. addindent(m and tostring(m) or "nil", 2)
    end
    local s = class_name(self) .. "("
    if #lines > 0 then
        if nextra == 1 and #lines == 1 then s = s .. lines[1]
        else s = s .. "\n  " .. table.concat(lines, "\n  ") .. "\n" end
    end
    return s .. ")"
end

-- Format a value the way extra_repr shows it ("1e-05", "(3, 3)", "'tanh'", "true", "nil").
function Module._fmt(v)
    if type(v) == "number" then
        if v % 1 == 0 and math.abs(v) < 2^53 then return string.format("%d", v) end
        return tostring(v)
    elseif type(v) == "string" then
        return "'" .. v .. "'"
    elseif type(v) == "table" then
        return shape_str(v)
    end
    return tostring(v)
end

Module.Parameter = Parameter
Module.is_parameter = is_parameter
Module.is_module = is_module
Module._prepare_class = prepare_class

return Module
