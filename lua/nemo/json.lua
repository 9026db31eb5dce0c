-- lua/nemo/json.lua: JSON for configs. decode keeps JSON null as json.null (so "out_channels":
-- null survives a round trip); encode writes what Python's json.dumps(indent=2, sort_keys=True)
-- writes for diffusers configs (keys sorted, 2-space indent, shortest round-trip floats).
-- Lua cannot tell [] from {}: an empty table encodes as {} unless marked with json.array(t).
local cjson = require("cjson.safe").new()
cjson.decode_invalid_numbers(false)

local M = {}
M.null = cjson.null
local array_mt = {__name = "json.array"}
function M.array(t) return setmetatable(t or {}, array_mt) end

-- decode(text[, name]): errors name `name` (a file path) and cjson's reason.
function M.decode(text, name)
    local v, err = cjson.decode(text)
    if err then error(string.format("%s: invalid JSON: %s", name or "json", err), 2) end
    return v
end

function M.read_file(path)
    local f, err = io.open(path, "rb")
    if not f then error("cannot read '" .. tostring(path) .. "': " .. tostring(err), 2) end
    local text = f:read("*a")
    f:close()
    local ok, v = pcall(M.decode, text, path)
    if not ok then error(v, 2) end
    return v
end

local function number_str(x)
    if x ~= x or x == math.huge or x == -math.huge then
        error("json.encode: NaN and infinity cannot be written as JSON", 4)
    end
    if x == math.floor(x) and math.abs(x) < 2^53 then return string.format("%d", x) end
    for _, fmt in ipairs { "%.15g", "%.16g", "%.17g" } do
        local s = string.format(fmt, x)
        if tonumber(s) == x then return s end
    end
end

local function is_array(t)
    if getmetatable(t) == array_mt then return true end
    local n = #t
    if n == 0 then return false end
    local count = 0
    for _ in pairs(t) do count = count + 1 end
    return count == n
end

local function encode(v, indent, depth, out)
    local tv = type(v)
    if v == nil or v == cjson.null then out[#out + 1] = "null"
    elseif tv == "boolean" then out[#out + 1] = v and "true" or "false"
    elseif tv == "number" then out[#out + 1] = number_str(v)
    elseif tv == "string" then out[#out + 1] = cjson.encode(v)
    elseif tv == "table" then
        local pad = indent and ("\n" .. string.rep(" ", indent * (depth + 1))) or ""
        local endpad = indent and ("\n" .. string.rep(" ", indent * depth)) or ""
        local sep = indent and "," or ","
        local colon = indent and ": " or ":"
        if is_array(v) then
            if #v == 0 then out[#out + 1] = "[]"; return end
            out[#out + 1] = "["
            for i = 1, #v do
                if i > 1 then out[#out + 1] = sep end
                out[#out + 1] = pad
                encode(v[i], indent, depth + 1, out)
            end
            out[#out + 1] = endpad .. "]"
        else
            local keys = {}
            for k in pairs(v) do
                if type(k) ~= "string" then error("json.encode: object keys must be strings, got " .. type(k), 4) end
                keys[#keys + 1] = k
            end
            if #keys == 0 then out[#out + 1] = "{}"; return end
            table.sort(keys)
            out[#out + 1] = "{"
            for i, k in ipairs(keys) do
                if i > 1 then out[#out + 1] = sep end
                out[#out + 1] = pad .. cjson.encode(k) .. colon
                encode(v[k], indent, depth + 1, out)
            end
            out[#out + 1] = endpad .. "}"
        end
    else
        error("json.encode: cannot encode a " .. tv, 4)
    end
end

-- encode(value[, {indent = 2}]) with sorted keys.
function M.encode(v, opts)
    local out = {}
    encode(v, opts and opts.indent, 0, out)
    return table.concat(out)
end

-- Write atomically: a temporary file renamed into place, so a failure leaves no half file.
function M.write_file(path, v, opts)
    local text = M.encode(v, opts or {indent = 2}) .. "\n"
    local tmp = path .. ".tmp"
    local f, err = io.open(tmp, "wb")
    if not f then error("cannot write '" .. tostring(path) .. "': " .. tostring(err), 2) end
    f:write(text)
    f:close()
    local ok, rerr = os.rename(tmp, path)
    if not ok then os.remove(tmp); error("cannot write '" .. tostring(path) .. "': " .. tostring(rerr), 2) end
end

return M
