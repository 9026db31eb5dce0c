-- tests/lua/dist_tap.lua: TAP checks for scripts that run on every rank of a process group
-- (tests/lua/test_dist.lua, test_fsdp.lua, tests/fake/dist_nccl.lua). A check passes only where
-- it passes on every rank (decided with an all-reduce of a CPU int32 tensor, so over MPI under
-- any backend); rank 0 alone prints TAP, and a failing rank says what failed on stderr.
--
--   local R = require("dist_tap").new(T, dist)   -- T: tests/lua/tap.lua; dist: nemo.dist, initialized
--   R.ok(cond, name, diag)   R.raises(fn, plain_substring, name)   R.skip(name, why)
--   R.agree(cond)            -- true when cond holds on every rank
--   R.rel_diff(a, ref)       -- max|a - ref| / max|ref| over flattened values (math.huge on a size mismatch)
--   R.done()                 -- rank 0 closes the plan; every rank exits 0 when all checks passed
local nemo = require "nemo"

local M = {}

function M.new(T, dist)
    local rank, world = dist.get_rank(), dist.get_world_size()
    local main = rank == 0
    local R = {rank = rank, world = world, main = main, all_ok = true}

    function R.agree(cond)
        if world == 1 then return cond end
        local t = nemo.tensor({cond and 1 or 0}, {dtype = "int32"})
        dist.all_reduce(t, "min")
        return t:item() == 1
    end

    function R.ok(cond, name, diag)
        if not cond then
            io.stderr:write(string.format("# rank %d: FAILED %s%s\n", rank, name, diag and (": " .. diag) or ""))
        end
        local all = R.agree(not not cond)
        if not all then R.all_ok = false end
        if main then T.ok(all, name) end
        return all
    end

    function R.raises(fn, pattern, name)
        local pok, err = pcall(fn)
        err = tostring(err)
        return R.ok(not pok and err:find(pattern, 1, true) ~= nil, name, pok and "no error" or ("error was: " .. err))
    end

    function R.skip(name, why) if main then T.skip(name, why) end end

    function R.rel_diff(a, ref)
        local d, m = T.maxdiff(a, ref)
        return m > 0 and d / m or d
    end

    function R.done()
        if main then T.done() end
        os.exit(R.all_ok and 0 or 1)
    end

    return R
end

return M
