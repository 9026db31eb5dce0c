-- tests/lua/test_docs.lua: the README and docs/ say true things about the API. The README's Lua
-- example runs as written; every `nemo.<name>` the README and docs/*.md write in backticks
-- resolves from require "nemo" (or is a module require can load); every `F.<name>` of the
-- README is a function of nemo.nn.functional.
local T = require "tests.lua.tap"
local nemo = require "nemo"

local read = T.read_bytes
local readme = read("README.md")

-- ==== the README's Lua example ====
local n = 0
for code in readme:gmatch("```lua\n(.-)```") do
    n = n + 1
    local printed = {}
    local env = setmetatable({print = function(...) printed[#printed + 1] = select("#", ...) end}, {__index = _G})
    local chunk, err = loadstring(code, "=README.md lua block " .. n)
    local ok, rerr = false, err
    if chunk then
        setfenv(chunk, env)
        ok, rerr = pcall(chunk)
    end
    T.ok(ok, string.format("README lua block %d runs as written", n), rerr)
    T.ok(#printed > 0, string.format("README lua block %d prints (%d print calls)", n, #printed))
end
T.ok(n >= 1, "the README has a Lua example")

-- ==== names in backticks ====
local function resolve(root, path)
    local v = root
    for part in path:gmatch("[^%.]+") do
        if type(v) ~= "table" then return nil end
        v = v[part]
        if v == nil then return nil end
    end
    return v
end
local files = {"README.md"}
local p = io.popen("ls docs/*.md")
for f in p:lines() do files[#files + 1] = f end
p:close()
T.ok(#files > 3, string.format("found README.md and %d docs", #files - 1))
for _, f in ipairs(files) do
    local text = read(f)
    local bad, count = {}, 0
    for span in text:gmatch("`([^`\n]+)`") do
        if span:find("<Tab>", 1, true) then span = "" end   -- a completion example (docs/repl.md)
        for name in span:gmatch("%f[%w_]nemo%.([%a_][%w_%.]*[%w_])") do
            count = count + 1
            if resolve(nemo, name) == nil and not package.searchpath("nemo." .. name, package.path) then
                bad[#bad + 1] = "nemo." .. name .. "   (in `" .. span .. "`)"
            end
        end
    end
    T.ok(#bad == 0, string.format("%s: the %d nemo.* names in backticks exist", f, count), table.concat(bad, "\n"))
end
local F = nemo.nn.functional
local bad, count = {}, 0
for span in readme:gmatch("`([^`\n]+)`") do
    for name in span:gmatch("%f[%w_]F%.([%a_][%w_]*)") do
        count = count + 1
        if type(F[name]) ~= "function" then bad[#bad + 1] = "F." .. name end
    end
end
T.ok(count > 0 and #bad == 0, string.format("README: the %d F.* names in backticks are functions", count),
    table.concat(bad, "\n"))

-- a name that does not exist is caught (the check can fail)
T.ok(resolve(nemo, "NeMoAutoDiffusionPipeline.from_pretrained") ~= nil and resolve(nemo, "no_such_name") == nil,
    "the resolver finds nemo.NeMoAutoDiffusionPipeline.from_pretrained and not nemo.no_such_name")
T.done()
