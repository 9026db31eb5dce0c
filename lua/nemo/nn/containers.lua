-- lua/nemo/nn/containers.lua: nn.ModuleList and nn.Sequential.
--
-- Children are named "0", "1", ... as in PyTorch, so parameter names match diffusers'
-- ("transformer_blocks.0.attn.to_q.weight"). The Lua API counts positions from 1: get(1) is the
-- child named "0", and `for i, m in list:iter()` runs i = 1..len() like ipairs. Numeric
-- indexing (list[0], list[1]) is refused with an error saying this, because either base would
-- silently pick the wrong child for someone; use list:get(i) or the name, list["0"].
-- LuaJIT ignores __len on tables, so the length is list:len().
local class = require "nemo.class"
local Module = require "nemo.nn.module"

local raise = Module._raise

-- ==== shared list behaviour ====

local function names_of(self) return rawget(self, "_module_names") end

local function len(self) return #names_of(self) end

local function position(self, i, what)
    local n = len(self)
    if type(i) ~= "number" or i % 1 ~= 0 then
        raise(string.format("%s:%s: index must be an integer, got %s", Module._get_name(self), what, tostring(i)))
    end
    local j = i < 0 and n + 1 + i or i
    if j < 1 or j > n then
        raise(string.format("%s:%s: index %d out of range (1..%d, or -1..-%d from the end)",
            Module._get_name(self), what, i, n, n))
    end
    return j
end

local function get(self, i)
    local j = position(self, i, "get")
    return rawget(self, "_vals")[names_of(self)[j]]
end

-- for i, m in list:iter() (i from 1; the child's name is tostring(i - 1))
local function iter(self)
    local names, vals = names_of(self), rawget(self, "_vals")
    local i = 0
    return function()
        i = i + 1
        local name = names[i]
        if name ~= nil then return i, vals[name] end
    end
end

local function append(self, m)
    if not Module.is_module(m) then
        raise(string.format("%s:append: expected an nn.Module, got %s", Module._get_name(self), type(m)))
    end
    self:add_module(tostring(len(self)), m)
    return self
end

local function extend(self, mods)
    if Module.is_module(mods) then
        local list = {}
        for _, m in mods:iter() do list[#list + 1] = m end
        mods = list
    end
    if type(mods) ~= "table" then
        raise(string.format("%s:extend: expected an array of modules, got %s", Module._get_name(self), type(mods)))
    end
    for k, m in ipairs(mods) do
        if not Module.is_module(m) then
            raise(string.format("%s: element %d is a %s, not an nn.Module", Module._get_name(self), k, type(m)))
        end
        self:add_module(tostring(len(self)), m)
    end
    return self
end

-- Re-register children as "0".."n-1" in the order of `mods`.
local function renumber(self, mods)
    local kinds, vals, names = rawget(self, "_kind"), rawget(self, "_vals"), names_of(self)
    for _, name in ipairs(names) do kinds[name] = nil; vals[name] = nil end
    for i = #names, 1, -1 do names[i] = nil end
    for i, m in ipairs(mods) do
        local name = tostring(i - 1)
        names[i] = name
        kinds[name] = "module"
        vals[name] = m
    end
end

-- insert(i, m): m becomes position i (1-based; len()+1 appends); later children shift by one.
local function insert(self, i, m)
    if not Module.is_module(m) then
        raise(string.format("%s:insert: expected an nn.Module, got %s", Module._get_name(self), type(m)))
    end
    local n = len(self)
    if i == n + 1 then return append(self, m) end
    local j = position(self, i, "insert")
    local mods = {}
    for _, c in iter(self) do mods[#mods + 1] = c end
    table.insert(mods, j, m)
    renumber(self, mods)
    return self
end

-- pop(i=-1): removes and returns the child at position i; later children shift down.
local function pop(self, i)
    local j = position(self, i or -1, "pop")
    local mods = {}
    for _, c in iter(self) do mods[#mods + 1] = c end
    local m = table.remove(mods, j)
    renumber(self, mods)
    return m
end

local function index_error(self, k)
    raise(string.format("%s: numeric index [%s] is not supported: use :get(i) with a 1-based position " ..
        "(get(1) is the child named \"0\") or the child's name, e.g. [\"%s\"]", Module._get_name(self),
        tostring(k), tostring(k)))
end

local function add_list_api(cls)
    cls.len, cls.get, cls.iter, cls.append, cls.extend, cls.insert, cls.pop =
        len, get, iter, append, extend, insert, pop
    cls._get_number = index_error
    cls._set_number = index_error
end

-- ==== ModuleList ====

local ModuleList = class("nemo.nn.ModuleList", Module)
add_list_api(ModuleList)

-- ModuleList(mods): mods is an optional Lua array of modules (or another ModuleList).
function ModuleList:__init(mods)
    Module.__init(self)
    if mods ~= nil then extend(self, mods) end
end

-- Like torch, runs of identical children print once: "(0-2): 3 x Linear(...)".
function ModuleList:__tostring()
    local reprs = {}
    for _, m in iter(self) do reprs[#reprs + 1] = tostring(m) end
    local name = Module._get_name(self)
    if #reprs == 0 then return name .. "()" end
    local lines = {}
    local i = 1
    while i <= #reprs do
        local j = i
        while j < #reprs and reprs[j + 1] == reprs[i] do j = j + 1 end
        local line
        if j == i then line = string.format("(%d): %s", i - 1, reprs[i])
        else line = string.format("(%d-%d): %d x %s", i - 1, j - 1, j - i + 1, reprs[i]) end
        lines[#lines + 1] = Module._addindent(line, 2)
        i = j + 1
    end
    return name .. "(\n  " .. table.concat(lines, "\n  ") .. "\n)"
end

-- ==== Sequential ====

local Sequential = class("nemo.nn.Sequential", Module)
add_list_api(Sequential)

-- Sequential(m1, m2, ...) or Sequential({m1, m2, ...})
function Sequential:__init(...)
    Module.__init(self)
    local first = ...
    if select("#", ...) == 1 and type(first) == "table" and not Module.is_module(first) then
        extend(self, first)
    else
        local mods = {...}
        for k = 1, select("#", ...) do
            if not Module.is_module(mods[k]) then
                raise(string.format("Sequential: argument %d is a %s, not an nn.Module", k, type(mods[k])))
            end
        end
        extend(self, mods)
    end
end

-- The first child gets all the arguments; each next child gets the previous one's output.
function Sequential:forward(...)
    local names, vals = names_of(self), rawget(self, "_vals")
    local n = #names
    local i = 1
    while i <= n and vals[names[i]] == nil do i = i + 1 end     -- skip children set to nil
    if i > n then return ... end
    local x = vals[names[i]](...)
    for k = i + 1, n do
        local m = vals[names[k]]
        if m ~= nil then x = m(x) end
    end
    return x
end

return {ModuleList = ModuleList, Sequential = Sequential}
