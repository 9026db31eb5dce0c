-- lua/nemo/cliargs.lua: the command-line parsing of the tools/ programs (flux_sample, wan_sample,
-- encode_images, encode_videos), so they read options and fail the same way.
--
--   local cli = require "nemo.cliargs"
--   local o = cli.parse(arg, {name = "wan_sample", usage = {"usage: ...", "       [...]"},
--       defaults = {steps = 50, prompts = {}},
--       strings = {["--model"] = "model"}, lists = {["--prompt"] = "prompts"},
--       numbers = {["--guidance"] = "guidance"},            -- any number
--       counts = {["--steps"] = "steps"},                    -- positive integers
--       flags = {["--force"] = "force"}})                    -- no value: true
--   cli.main("wan_sample", function() ... end)               -- errors: "wan_sample: msg", exit 1
--
-- -h / --help prints the usage and exits 0; an unknown option, a missing value or a bad number
-- prints "<name>: <what>" and the usage on stderr and exits 2.
local M = {}

-- usage(spec, msg): the usage on stderr (after "<name>: msg" when msg), then exit 2 (0 without msg)
function M.usage(spec, msg)
    io.stderr:write(msg and (spec.name .. ": " .. msg .. "\n") or "", table.concat(spec.usage, "\n"), "\n")
    os.exit(msg and 2 or 0)
end

-- parse(args, spec) -> options table (spec.defaults copied, lists copied fresh)
function M.parse(args, spec)
    local o = {}
    for k, v in pairs(spec.defaults or {}) do
        if type(v) == "table" then
            local c = {}
            for i, x in ipairs(v) do c[i] = x end
            v = c
        end
        o[k] = v
    end
    local strings, lists, numbers = spec.strings or {}, spec.lists or {}, spec.numbers or {}
    local counts, flags = spec.counts or {}, spec.flags or {}
    local i = 1
    while i <= #args do
        local a, v = args[i], args[i + 1]
        if a == "-h" or a == "--help" then M.usage(spec) end
        if flags[a] then
            o[flags[a]] = true
            i = i + 1
        else
            if not (strings[a] or lists[a] or numbers[a] or counts[a]) then M.usage(spec, "unknown option " .. a) end
            if v == nil then M.usage(spec, "option " .. a .. " needs a value") end
            if strings[a] then
                o[strings[a]] = v
            elseif lists[a] then
                local l = o[lists[a]] or {}
                l[#l + 1] = v
                o[lists[a]] = l
            else
                local n = tonumber(v)
                if counts[a] and (not n or n < 1 or n % 1 ~= 0) then
                    M.usage(spec, a .. " needs a positive integer, got '" .. v .. "'")
                elseif not n then
                    M.usage(spec, a .. " needs a number, got '" .. v .. "'")
                end
                o[numbers[a] or counts[a]] = n
            end
            i = i + 2
        end
    end
    return o
end

-- main(name, fn): runs fn; an error is printed as "<name>: <error>" on stderr and exits 1
function M.main(name, fn)
    local ok, err = pcall(fn)
    if not ok then
        io.stderr:write(name, ": ", tostring(err), "\n")
        os.exit(1)
    end
end

return M
