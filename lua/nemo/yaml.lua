-- lua/nemo/yaml.lua: YAML configs through libyaml (engine/yaml.c turns YAML into JSON text,
-- lua-cjson decodes it). load(text[, name]) / load_file(path) return Lua values: mappings are
-- tables, sequences arrays, scalars typed (ints, floats incl. 2e-5, bools, null -> nemo.yaml.null
-- inside sequences and nil in mappings, .inf/.nan -> math.huge / 0/0). Anchors and merge keys
-- are resolved. Errors name the file and the line.
local ffi = require "ffi"
local cjson = require("cjson.safe").new()
cjson.decode_invalid_numbers(true)
local nffi = require "nemo.ffi"

local C = nffi.C
local M = {}

-- the null value kept where dropping it would shift a list
M.null = cjson.null

local function fix(v, in_list)
    if v == cjson.null then return in_list and M.null or nil end
    if type(v) == "table" then
        local out = {}
        if #v > 0 or next(v) == nil then
            for i = 1, #v do out[i] = fix(v[i], true) end
            for k, x in pairs(v) do
                if type(k) ~= "number" then out[k] = fix(x, false) end
            end
        else
            for k, x in pairs(v) do out[k] = fix(x, false) end
        end
        return out
    end
    return v
end

function M.load(text, name)
    if type(text) ~= "string" then error("yaml.load: expected a string, got " .. type(text), 2) end
    local p = C.nemo_yaml_to_json(text, #text, name or "<yaml string>")
    if p == nil then error(ffi.string(C.nemo_last_error()), 2) end
    local json = ffi.string(p)
    C.nemo_free(p)
    local v, err = cjson.decode(json)
    if err then error("yaml.load: internal JSON error: " .. err, 2) end
    v = fix(v, false)
    return v
end

-- load from a file; errors name the path.
function M.load_file(path)
    local f, err = io.open(path, "rb")
    if not f then error("yaml.load_file: cannot open '" .. tostring(path) .. "': " .. tostring(err), 2) end
    local text = f:read("*a")
    f:close()
    local ok, res = pcall(M.load, text, path)
    if not ok then error(res, 2) end
    return res
end

return M
