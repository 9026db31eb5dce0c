-- tests/gpu/check_streams.lua: CUDA streams and events (nemo.cuda.Stream / Event, t:to with
-- non_blocking, t:record_stream), the allocator's per-stream caching and the pinned-block guard
-- (TAP). Runs in three places:
-- - on the fake devices (tests/sh/test_fake_cuda.sh, NEMO_FAKE_CUDA=2): work runs at once, but
--   an event counts as complete only after something waited for it (engine/fake_cuda.c), so
--   "the block waits for the other stream" is observable as addresses;
-- - on the CUDA emulator (tests/sh/test_cuda_emu.sh, NEMO_EMU_CUDA_DEVICES=2): each stream's
--   work is deferred until the host must see it (tests/cuda_emu/emu.cc), so a missing wait also
--   shows in the values;
-- - on a GPU (tests/gpu/run.sh, NEMO_EXPECT_CUDA=1), where streams really run at once: there
--   the checks that depend on work still being queued (an event not yet complete, a block not
--   yet reusable) are skipped, and the values must hold.
-- The checks that need a second device are skipped with one.
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = here .. "/../lua/?.lua;" .. package.path
local T = require "tap"
local ffi = require "ffi"
local nemo = require "nemo"
local C = require("nemo.ffi").C
local cuda = nemo.cuda

local emulated = os.getenv("NEMO_FAKE_CUDA") == "2" or os.getenv("NEMO_EMU_CUDA_DEVICES") == "2"
if not emulated and os.getenv("NEMO_EXPECT_CUDA") ~= "1" then
    io.write("1..0 # SKIP run on 2 emulated devices (NEMO_FAKE_CUDA=2, NEMO_EMU_CUDA_DEVICES=2) or on a GPU " ..
             "(NEMO_EXPECT_CUDA=1, tests/gpu/run.sh)\n")
    os.exit(0)
end
if not cuda.is_available() then
    io.write("1..0 # SKIP no CUDA device\n")   -- NEMO_EXPECT_CUDA with no device: test_cuda.lua fails for that
    os.exit(0)
end
local two = cuda.device_count() >= 2
-- a check that holds only where queued work waits (emulated devices), or only with 2 devices
local function when(cond, why, fn, name)
    if cond then fn() else T.skip(name, why) end
end
local QUEUED = "needs work to stay queued (emulated devices); a GPU may have finished it"
local TWO = "needs a second device"
local D = "cuda:0"
local function stats() return nemo.memory_stats(D) end
local function addr(t) return tonumber(ffi.cast("uintptr_t", C.nemo_tensor_data(t._c))) end
local KiB64 = 65536
local function block() return nemo.empty({KiB64 / 4}, {device = D}) end   -- one 64 KiB size class

-- ==== streams ====
local s1 = cuda.Stream()
T.is(s1.id, 1, "the first cuda.Stream() is pool stream 1 of the current device")
T.is(s1.device, 0, "on the current device, cuda:0")
T.is(cuda.current_stream().id, 0, "the current stream starts as the default stream (id 0)")
T.ok(cuda.default_stream() == cuda.current_stream(), "default_stream() == current_stream() at first")
local ids = {}
for i = 1, 32 do ids[i] = cuda.Stream().id end
T.is(ids[31] .. "," .. ids[32], "32,1", "the pool has 32 streams: Stream() hands them out in turn and wraps around")
when(two, TWO, function() T.is(cuda.Stream(1).device, 1, "cuda.Stream(1) is a stream of cuda:1") end,
     "cuda.Stream(1) is a stream of cuda:1")
local nd = cuda.device_count()
T.raises(function() cuda.Stream(nd) end, "cuda:" .. nd .. " does not exist", "a stream of a device that does not exist is an error")
T.raises(function() cuda.set_stream(3) end, "expected a cuda.Stream", "set_stream(3) is an error naming the type")

local x = nemo.randn({64, 64}, {generator = nemo.Generator(1)}):to(D)
local ref = x:matmul(x):sum():item()
local got, inside = cuda.stream(s1, function() return x:matmul(x):sum():item(), cuda.current_stream().id end)
T.is(inside, 1, "inside cuda.stream(s1, fn) the current stream is s1")
-- emulated: the same bits; on a GPU cuBLASLt may pick another algorithm for another stream's
-- workspace, so within float32 rounding of a 64-term dot product sum (relative 1e-5)
if emulated then
    T.is(got, ref, "an op run on a pool stream gives the default stream's result")
else
    T.ok(math.abs(got - ref) <= 1e-5 * math.max(1, math.abs(ref)),
         string.format("an op run on a pool stream gives the default stream's result (%.9g vs %.9g, within 1e-5)", got, ref))
end
T.is(cuda.current_stream().id, 0, "after cuda.stream the previous stream is current again")
T.raises(function() cuda.stream(s1, function() error("boom") end) end, "boom", "cuda.stream passes fn's error on")
T.is(cuda.current_stream().id, 0, "... and restores the previous stream after an error")
cuda.set_stream(s1)
T.is(cuda.current_stream().id, 1, "set_stream(s1) makes s1 current")
when(two, TWO, function() T.is(cuda.current_stream(1).id, 0, "the current stream is per device: cuda:1 keeps its default stream") end,
     "the current stream is per device: cuda:1 keeps its default stream")
cuda.set_stream(cuda.default_stream())
T.ok(s1:query(), "Stream:query(): an idle stream reports done")
s1:synchronize()
T.ok(true, "Stream:synchronize() returns")

-- ==== events ====
local e = cuda.Event()
T.ok(e:query(), "an event never recorded counts as complete")
e:record(s1)
when(emulated, QUEUED, function() T.ok(not e:query(), "an event just recorded is not complete yet on the emulated device") end,
     "an event just recorded is not complete yet on the emulated device")
s1:synchronize()
T.ok(e:query(), "synchronizing its stream completes it")
local t0, t1 = cuda.Event{enable_timing = true}, cuda.Event{enable_timing = true}
t0:record()
local y = x:matmul(x)
t1:record()
t1:synchronize()
local ms = t0:elapsed_time(t1)
T.ok(ms >= 0 and ms < 60000, string.format("elapsed_time between two timing events: %.3f ms", ms))
T.raises(function() e:elapsed_time(t1) end, "enable_timing", "elapsed_time needs timing events")
T.raises(function() cuda.Event{enable_timing = true}:elapsed_time(t1) end, "recorded first",
         "elapsed_time of an event never recorded is an error")
T.raises(function() cuda.Event{timing = true} end, "unknown option 'timing'", "cuda.Event rejects unknown options")
when(two, TWO, function()
    T.raises(function() cuda.Event{device = 1}:record(s1) end, "made for cuda:1",
             "recording an event on a stream of another device is an error")
end, "recording an event on a stream of another device is an error")
local w = s1:record_event()
T.ok(getmetatable(w) == getmetatable(e), "Stream:record_event() returns an event")
cuda.current_stream():wait_event(w)
cuda.current_stream():wait_stream(s1)
T.ok(true, "wait_event and wait_stream queue their waits")
y:free()

-- ==== the allocator caches per stream ====
nemo.empty_cache(D)
local a = cuda.stream(s1, block)
local pa = addr(a)
a:free()
T.is(stats().cached, KiB64, "a block freed after use on s1 is cached (64 KiB)")
local b = block()
T.ok(addr(b) ~= pa, "the default stream does not get a block cached for s1")
T.is(stats().cached, KiB64, "... which stays cached")
local c = cuda.stream(s1, block)
T.is(addr(c), pa, "a request on s1 gets s1's cached block")
T.is(stats().cached, 0, "... and the cache is empty again")
b:free(); c:free()
nemo.empty_cache(D)

-- record_stream: a default-stream block also used on s1 waits for s1's work before reuse
local r = block()
local pr = addr(r)
r:record_stream(s1)
r:free()
T.is(stats().cached, KiB64, "a freed block recorded on s1 counts as cached")
local r2 = block()
when(emulated, QUEUED, function() T.ok(addr(r2) ~= pr, "while s1's work may still read it, the block is not handed out again") end,
     "while s1's work may still read it, the block is not handed out again")
r2:free()
s1:synchronize()
local pool = {}
for i = 1, 2 do pool[i] = block() end
T.ok(addr(pool[1]) == pr or addr(pool[2]) == pr, "once s1 has finished, the block is reused")
for _, t in ipairs(pool) do t:free() end
local r3 = block()
r3:record_stream(s1)
r3:free()
nemo.empty_cache(D)
T.is(stats().cached, 0, "empty_cache waits for blocks recorded on other streams and frees them too")
T.raises(function() r3:record_stream(s1) end, "", "record_stream on a freed tensor handle is an error")
when(two, TWO, function()
    T.raises(function() nemo.empty({4}, {device = "cuda:1"}):record_stream(s1) end, "the stream on cuda:0",
             "record_stream with a stream of another device is an error")
end, "record_stream with a stream of another device is an error")
T.raises(function() nemo.empty({4}):record_stream(s1) end, "is on cpu",
         "record_stream of a CPU tensor is an error")
do   -- the data: s1 still reads x when x is freed and a default-stream tensor is made; on the
     -- emulator's deferred streams that tensor's write runs first (newest stream first), so the
     -- result is right only if the freed block was not handed out again
    nemo.empty_cache(D)
    local x = nemo.full({KiB64 / 4}, 3, {device = D})
    s1:wait_stream(cuda.current_stream())
    local y = cuda.stream(s1, function() return x * 2 end)
    x:record_stream(s1)
    x:free()
    local z = nemo.full({KiB64 / 4}, 7, {device = D})
    cuda.synchronize(D)
    T.ok(T.same_bits(y:cpu(), nemo.full({KiB64 / 4}, 6)), "s1's reads of a recorded, freed tensor are not overwritten "
         .. "by the tensor made next")
    y:free(); z:free()
end
do   -- a block allocated on s1 and recorded on s1 itself needs no wait
    local q = cuda.stream(s1, block)
    local pq = addr(q)
    q:record_stream(s1)
    q:free()
    local q2 = cuda.stream(s1, block)
    T.is(addr(q2), pq, "recording a block on its own stream changes nothing: reused at once on that stream")
    q2:free()
end

-- ==== non_blocking copies ====
local host = nemo.arange(0, 4096, 1, {dtype = "float32"})
local pinned = host:pin_memory()
local dev = pinned:to{device = D, non_blocking = true}
T.ok(T.same_bits(dev:cpu(), host), "a pinned tensor copied to the device with non_blocking arrives intact")
local back = dev:to{device = "cpu", non_blocking = true}
cuda.synchronize(D)
T.ok(back:is_pinned(), "a non_blocking copy to the cpu lands in pinned memory")
T.ok(T.same_bits(back, host), "... and holds the values once the device is synchronized")
local into = nemo.empty({4096}, {device = D})
into:copy_(pinned, true)
T.ok(T.same_bits(into:cpu(), host), "copy_(pinned, true) fills a device tensor without blocking")
local plain = host:to{device = D, non_blocking = true}
T.ok(T.same_bits(plain:cpu(), host), "non_blocking from pageable memory falls back to a synchronous copy")
local conv = pinned:to{device = D, dtype = "bfloat16", non_blocking = true}
T.ok(T.same_bits(conv:cpu(), host:to{dtype = "bfloat16"}), "non_blocking with a dtype change is a synchronous copy")
-- the pinned source freed while its copy may still run: its block is not handed to the next
-- pin_memory until the copy has completed
nemo.empty_cache("cpu")
local src = nemo.ones({262144}):pin_memory()
local psrc = addr(src)
local d2 = src:to{device = D, non_blocking = true}
src:free()
local other = nemo.zeros({262144}):pin_memory()
when(emulated, QUEUED, function()
    T.ok(addr(other) ~= psrc, "a pinned block freed during its non_blocking copy is not reused before the copy completes")
end, "a pinned block freed during its non_blocking copy is not reused before the copy completes")
other:free()
cuda.synchronize(D)
local again = {nemo.zeros({262144}):pin_memory(), nemo.zeros({262144}):pin_memory()}
T.ok(addr(again[1]) == psrc or addr(again[2]) == psrc, "after a synchronize the pinned block is reused")
again[1]:free(); again[2]:free()
T.ok(T.same_bits(d2:cpu(), nemo.ones({262144})), "... and the copy read the freed source's values, not the next "
     .. "pin_memory's")
d2:free()

-- the data loader's pin_memory: the same batches on the device, uploaded through pinned memory
do
    local synthetic = require "nemo.data.synthetic"
    local data = require "nemo.data"
    local fs = require "nemo.fs"
    local dir = os.tmpname()
    os.remove(dir)
    fs.mkdirs(dir)
    dir = dir .. "/cache"
    synthetic.make{out = dir, samples = 6, model = "flux", resolutions = "16x16", seed = 5}
    local function batches(pin)
        local dl = data.build_dataloader{cache_dir = dir, batch_size = 2, seed = 1, device = D, pin_memory = pin}
        local out = {}
        for b in dl:iter() do out[#out + 1] = b end
        return out, dl
    end
    local plain = batches(false)
    local pinned_b, dl = batches(true)
    T.ok(dl.pin_memory, "build_dataloader{pin_memory = true, device = cuda:0} stages batches in pinned memory")
    local same = #plain == #pinned_b and #plain == 3
    for i = 1, #plain do
        for _, k in ipairs{"image_latents", "text_embeddings", "pooled_prompt_embeds"} do
            same = same and pinned_b[i][k].device == D and T.same_bits(pinned_b[i][k]:cpu(), plain[i][k]:cpu())
        end
    end
    T.ok(same, "pin_memory gives the same 3 batches, on cuda:0, bit for bit")
    local dl_cpu = data.build_dataloader{cache_dir = dir, batch_size = 2, seed = 1, pin_memory = true}
    T.ok(not dl_cpu.pin_memory, "pin_memory without a CUDA device is ignored, as in torch's DataLoader")
    T.sh("rm -rf '" .. dir:match("^(.*)/cache$") .. "'")
end

T.done()
