-- lua/nemo/hub.lua: where model folders come from. A path_or_id is a local folder, or an
-- "org/name" repository id resolved offline in the Hugging Face cache (HF_HUB_CACHE, then
-- HF_HOME/hub, then ~/.cache/huggingface/hub; layout models--org--name/{refs/main,snapshots/<rev>}).
-- For configs only, the configs nemo-lua ships (lua/nemo/configs/<org>/<name>/...) are a last
-- resort, so from_config("black-forest-labs/FLUX.1-dev", ...) works with nothing downloaded.
local fs = require "nemo.fs"

local M = {}

function M.cache_dirs()
    local dirs = {}
    local hub_cache = os.getenv("HF_HUB_CACHE") or os.getenv("HUGGINGFACE_HUB_CACHE")
    if hub_cache and hub_cache ~= "" then dirs[#dirs + 1] = hub_cache end
    local hf_home = os.getenv("HF_HOME")
    if hf_home and hf_home ~= "" then dirs[#dirs + 1] = hf_home .. "/hub" end
    local home = os.getenv("HOME")
    local xdg = os.getenv("XDG_CACHE_HOME")
    if xdg and xdg ~= "" then dirs[#dirs + 1] = xdg .. "/huggingface/hub" end
    if home and home ~= "" then dirs[#dirs + 1] = home .. "/.cache/huggingface/hub" end
    return dirs
end

local function snapshot_in(cache, repo_id, revision)
    local base = cache .. "/models--" .. repo_id:gsub("/", "--")
    if not fs.isdir(base) then return nil end
    revision = revision or "main"
    local ref = base .. "/refs/" .. revision
    if fs.isfile(ref) then
        local rev = fs.read(ref):gsub("%s+$", "")
        local snap = base .. "/snapshots/" .. rev
        if fs.isdir(snap) then return snap end
    end
    local snap = base .. "/snapshots/" .. revision   -- a commit hash given directly
    if fs.isdir(snap) then return snap end
    if fs.isdir(base .. "/snapshots") then
        local snaps = fs.list(base .. "/snapshots")
        if #snaps == 1 then return base .. "/snapshots/" .. snaps[1] end
    end
    return nil
end

-- Shipped configs live beside this file: lua/nemo/configs/<org>/<name>.
local function shipped_dir(repo_id)
    local here = debug.getinfo(1, "S").source:match("^@(.*)/hub%.lua$")
    if not here then return nil end
    local d = here .. "/configs/" .. repo_id
    if fs.isdir(d) then return d end
    return nil
end

-- resolve(path_or_id, {shipped = true}) -> folder, or an error saying where it looked.
function M.resolve(path_or_id, opts)
    opts = opts or {}
    if type(path_or_id) ~= "string" or path_or_id == "" then
        error("expected a model folder or an 'org/name' repository id, got " .. tostring(path_or_id), 3)
    end
    if fs.isdir(path_or_id) then return path_or_id end
    local tried = {path_or_id .. " (not a folder)"}
    if path_or_id:match("^[%w%-%._]+/[%w%-%._]+$") then
        for _, cache in ipairs(M.cache_dirs()) do
            local snap = snapshot_in(cache, path_or_id, opts.revision)
            if snap then return snap end
            tried[#tried + 1] = cache .. "/models--" .. path_or_id:gsub("/", "--")
        end
        if opts.shipped then
            local d = shipped_dir(path_or_id)
            if d then return d, true end
            tried[#tried + 1] = "the configs shipped with nemo-lua (none for " .. path_or_id .. ")"
        end
    end
    error(string.format("model '%s' not found; looked in: %s. nemo-lua does not download: " ..
        "fetch it with `huggingface-cli download %s` or pass a local folder", path_or_id,
        table.concat(tried, ", "), path_or_id), 3)
end

return M
