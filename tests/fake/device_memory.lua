-- tests/fake/device_memory.lua: the CUDA caching allocator (engine/core.c) on an emulated device
-- with a capacity (run by tests/sh/test_fake_cuda.sh with NEMO_FAKE_CUDA=1 and
-- NEMO_FAKE_CUDA_MEM=16777216: 16 MiB; TAP): freed blocks are cached and reused by size class,
-- empty_cache gives them back, a request that only fits once the cache is released succeeds
-- (release and retry), and a request that cannot fit is a clear out-of-memory error after which
-- the device still works.
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/../lua/?.lua;" .. package.path
local T = require "tap"
local nemo = require "nemo"

if os.getenv("NEMO_FAKE_CUDA") ~= "1" or os.getenv("NEMO_FAKE_CUDA_MEM") ~= "16777216" then
    io.write("1..0 # SKIP run with NEMO_FAKE_CUDA=1 NEMO_FAKE_CUDA_MEM=16777216 (tests/sh/test_fake_cuda.sh)\n")
    os.exit(0)
end
local MiB = 2 ^ 20
local D = "cuda:0"
local function stats() return nemo.memory_stats(D) end
local function mib(n) return nemo.empty({n * MiB / 4}, {device = D}) end   -- n MiB of float32

local a = mib(6)
T.is(stats().current, 6 * MiB, "a 6 MiB tensor: 6 MiB current")
a:free()
T.is(stats().current, 0, "freed: nothing current")
T.is(stats().cached, 6 * MiB, "and its block is cached (6 MiB)")
local b = mib(6)
T.is(stats().cached, 0, "a new tensor of the same size class reuses the cached block")
b:free()
nemo.empty_cache(D)
T.is(stats().cached, 0, "empty_cache gives the cached blocks back")

-- 2 x 6 MiB cached, then 12 MiB asked for: it only fits once the cache is released
local x, y = mib(6), mib(6)
x:free(); y:free()
T.is(stats().cached, 12 * MiB, "two freed 6 MiB tensors: 12 MiB cached")
local ok, big = pcall(mib, 12)
T.ok(ok, "a 12 MiB tensor fits the 16 MiB device once the allocator releases its cache and retries",
    not ok and tostring(big) or nil)
T.is(stats().cached, 0, "the retry emptied the cache")
if ok then big:free() end

-- more than the device has: a clear error, then the device keeps working
local ok2, err = pcall(mib, 20)
T.ok(not ok2 and tostring(err):find("out of memory on cuda:0 allocating 20971520 bytes", 1, true) ~= nil,
    "20 MiB on a 16 MiB device: 'out of memory on cuda:0 allocating 20971520 bytes'", tostring(err))
T.ok(not ok2 and tostring(err):find("NEMO_FAKE_CUDA_MEM", 1, true) ~= nil,
    "the message carries the device's own reason", tostring(err))
local z = nemo.ones({1024}, {device = D})
T.is(z:sum():item(), 1024, "after the failure the device still computes")
T.ok(stats().peak <= 16 * MiB, string.format("the peak stays within the device (%d bytes)", stats().peak))
T.done()
