-- tests/lua/golden.lua: where the golden cases (diffusers' / PyTorch's reference numbers) are,
-- for every test that reads them.
--   local golden = require "golden"
--   local dir, why = golden.case("flux_tiny")   -- "<folder>/flux_tiny", or nil and a message
--   if not dir then T.ok(false, "flux_tiny golden cases: " .. why) end
-- The folder is, in this order: $NEMO_GOLDEN when set (and then only it: a wrong path fails
-- instead of quietly using another copy); else tests/golden in the checkout (committed, see
-- tests/golden/SOURCE.md); else ../shared/golden beside the checkout. The checkout is found from
-- this file's own path, so it works from tests/lua (package.path "tests/lua/?.lua") and from
-- tests/gpu ("tests/gpu/../lua/?.lua") alike. Missing cases are a failure, never a skip: a
-- golden check that does not run must not pass.
local fs = require "nemo.fs"

local M = {}

-- "a/b/../c/./d" -> "a/c/d" (textual; "." for an empty relative path)
local function normalize(p)
    local out = {}
    for seg in p:gmatch("[^/]+") do
        if seg == ".." and #out > 0 and out[#out] ~= ".." then out[#out] = nil
        elseif seg ~= "." then out[#out + 1] = seg end
    end
    local s = table.concat(out, "/")
    if p:sub(1, 1) == "/" then return "/" .. s end
    return s == "" and "." or s
end

local src = debug.getinfo(1, "S").source:gsub("^@", "")
M.root = normalize((src:match("^(.*)/[^/]*$") or ".") .. "/../..")   -- the checkout: tests/lua/../..

-- the folders searched when NEMO_GOLDEN is not set, in order
M.candidates = {normalize(M.root .. "/tests/golden"), normalize(M.root .. "/../shared/golden")}

-- the golden folder and how it was found ("$NEMO_GOLDEN" or the search); or nil and a message
-- naming what was searched
function M.dir()
    local env = os.getenv("NEMO_GOLDEN")
    if env and env ~= "" then
        if fs.isdir(env) then return env, "$NEMO_GOLDEN" end
        return nil, string.format("no golden cases: NEMO_GOLDEN=%s is not a folder (when set, only $NEMO_GOLDEN is " ..
            "searched; unset, the search is %s)", env, table.concat(M.candidates, ", then "))
    end
    for _, d in ipairs(M.candidates) do
        if fs.isdir(d) then return d, "the search of " .. table.concat(M.candidates, ", ") end
    end
    return nil, string.format("no golden cases: NEMO_GOLDEN is not set and none of %s is a folder " ..
        "(tests/golden is committed with the checkout; see tests/golden/SOURCE.md)", table.concat(M.candidates, ", "))
end

-- the folder of one case ("flux_tiny"), or nil and a message; file (optional): a file that case
-- must hold (e.g. "adamw.safetensors"), checked too
function M.case(name, file)
    local d, how = M.dir()
    if not d then return nil, how end
    local p = d .. "/" .. name
    if not fs.isdir(p) then
        return nil, string.format("no golden case %s in %s (found through %s)", name, d, how)
    end
    if file and not fs.isfile(p .. "/" .. file) then
        return nil, string.format("no %s in golden case %s", file, p)
    end
    return p
end

return M
