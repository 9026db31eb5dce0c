-- lua/nemo/class.lua: minimal classes. class(name, parent) -> cls, parent.
-- Calling cls(...) makes an instance and runs cls.__init(self, ...). Every class is recorded
-- by name in class.registry (PipelineSpec resolves "FluxTransformer2DModel" through it).
local class = {registry = {}}

local function new(cls, ...)
    local self = setmetatable({}, cls)
    if cls.__init then cls.__init(self, ...) end
    return self
end

setmetatable(class, {__call = function(_, name, parent)
    local cls = {}
    cls.__index = cls
    cls.__name = name
    cls.__parent = parent
    if parent then
        -- metamethods are not inherited through __index: copy them
        for _, k in ipairs { "__tostring", "__call", "__len", "__eq", "__concat" } do
            if rawget(parent, k) ~= nil then cls[k] = parent[k] end
        end
    end
    setmetatable(cls, {__index = parent, __call = new, __tostring = function() return "class " .. name end})
    class.registry[name] = cls
    -- the short name too ("nemo.nn.Linear" -> "Linear") unless it is taken
    local short = name:match("([^%.]+)$")
    if short ~= name and class.registry[short] == nil then class.registry[short] = cls end
    return cls, parent
end})

-- Is obj an instance of cls (or of a subclass)?
function class.isinstance(obj, cls)
    if type(obj) ~= "table" then return false end
    local mt = getmetatable(obj)
    while mt do
        if mt == cls then return true end
        mt = rawget(mt, "__parent")
    end
    return false
end

return class
