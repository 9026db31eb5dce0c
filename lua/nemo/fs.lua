-- lua/nemo/fs.lua: files and folders (engine/fs.c): exists/isdir/isfile, list, mkdirs,
-- copy_file, copy_tree, rename, remove_tree, join. Errors name the path.
local ffi = require "ffi"
local nffi = require "nemo.ffi"
local C = nffi.C

local M = {}
local function check(rc) if rc < 0 then error(ffi.string(C.nemo_last_error()), 3) end return rc end

function M.exists(p) return C.nemo_fs_kind(p) ~= 0 end
function M.isdir(p) return C.nemo_fs_kind(p) == 2 end
function M.isfile(p) return C.nemo_fs_kind(p) == 1 end
function M.size(p) return tonumber(check(C.nemo_fs_size(p))) end
function M.join(...)
    local parts = {...}
    local out = table.concat(parts, "/")
    return (out:gsub("//+", "/"))
end
function M.dirname(p) return p:match("^(.*)/[^/]*$") or "." end
function M.basename(p) return p:match("([^/]*)$") end

-- sorted names in a folder
function M.list(p)
    local s = C.nemo_fs_list(p)
    if s == nil then error(ffi.string(C.nemo_last_error()), 2) end
    local text = ffi.string(s)
    C.nemo_free(s)
    local out = {}
    for name in text:gmatch("[^\n]+") do out[#out + 1] = name end
    table.sort(out)
    return out
end
function M.mkdirs(p) check(C.nemo_fs_mkdirs(p)) end
function M.copy_file(a, b) check(C.nemo_fs_copy_file(a, b)) end
function M.rename(a, b) check(C.nemo_fs_rename(a, b)) end
function M.remove_tree(p) check(C.nemo_fs_remove_tree(p)) end
function M.sync_dir(p) check(C.nemo_fs_sync_dir(p)) end
function M.copy_tree(src, dst)
    M.mkdirs(dst)
    for _, name in ipairs(M.list(src)) do
        local a, b = src .. "/" .. name, dst .. "/" .. name
        if M.isdir(a) then M.copy_tree(a, b) else M.copy_file(a, b) end
    end
end
function M.read(p)
    local f, err = io.open(p, "rb")
    if not f then error("cannot read '" .. p .. "': " .. tostring(err), 2) end
    local s = f:read("*a")
    f:close()
    return s
end

return M
